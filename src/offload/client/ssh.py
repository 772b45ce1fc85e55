"""Workers and worker servers started over ssh: ``where=offload.SSH(...)`` and
``Pool(hosts=[offload.SSH(...)])``.

Theory of operation
-------------------
1. :class:`RemoteLaunch` runs the system ``ssh`` client (no pty, ``BatchMode``) as a
   child process of its own session, with a Unix socket forwarded from a fresh private
   directory here to a fresh private directory there (``ssh -L``). The remote command
   is ``exec PYTHON -c LOADER``: the loader reads :mod:`offload.bootstrap` from stdin
   and runs it, so nothing needs to be installed there but Python and nothing long
   travels in argv.
2. Right behind the bootstrap goes the request (:mod:`offload.bootstrap` step 1):
   packages and their hashes, the entry point, the settings, and the token, which is
   made here for this start and travels only over ssh's stdin. When the bootstrap says
   ``need``, the missing packages follow (a warm cache needs no round trip at all).
3. The remote entry point listens on its Unix socket and the bootstrap says ``ready``;
   whatever else the remote side wrote on stdout before that is relayed to stderr here
   with a ``[name]`` prefix, and so is everything it writes on stderr (through the
   ``ssh`` child's stderr, whose tail is kept for errors). If ssh or the remote side
   fails first, the start is a :class:`~offload.StartError` quoting what they said.
4. :class:`SSHSlot` is a :class:`~offload.client.remote.RemoteSlot` that connects to the
   forwarded socket with the token: calls, kills, timeouts and heartbeats work as with
   any worker server (``offload.server.over_ssh`` runs the very same server).
5. The remote side dies with the ssh connection (end of file on its stdin). A slot that
   ends closes ssh's stdin (stop) or SIGTERMs ssh (kill, a lost connection), and reports
   its end only once the ssh process has exited: a pool's shutdown leaves nothing
   behind, here or there. A connection that drops is a
   :class:`~offload.ConnectionLost` quoting ssh's last words, and the pool starts a new
   ssh for that host, as it reconnects to any host.

:func:`start_remote` is step 1 to 3 for any entry point (an actor over ssh uses it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from offload._record import replace  # ExitInfo is a record, SSHTarget a dataclass
from offload._version import __version__
from offload.client import outcome
from offload.client.remote import DEFAULT_HEARTBEAT, RemoteSlot, RemoteTarget
from offload.client.slot import ExitInfo
from offload.errors import StartError
from offload.process.child import KILL_GRACE, ChildProcess, popen, reap_pid
from offload.process.spec import LaunchSpec
from offload.transport.net import parse_address
from offload.transport.ssh import SSH, remote_python_command, ssh_argv

if TYPE_CHECKING:
    from offload.client.slot import SlotHost
    from offload.transport.loop import Loop

log = logging.getLogger("offload")

# Runs the bootstrap that follows on stdin (its length first, then its text): the
# command line stays short and needs no quoting beyond one level.
LOADER = (
    "import sys;b=sys.stdin.buffer;"
    "exec(compile(b.read(int(b.readline())),'offload-bootstrap','exec'))"
)
SERVER_ENTRY = "offload.server.over_ssh:serve"
# After closing ssh's stdin (the remote side then ends and ssh with it), how long ssh
# gets before it is terminated: a host that cannot be reached any more never answers.
CLOSE_GRACE = 5.0
_REMOTE_SOCKET_DIR = "/tmp"  # exists on every Unix; the socket's own directory is 0700


# -- packages the remote side may lack ------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """A local package (or module) as the bootstrap receives it.

    Attributes:
        name: its top-level import name.
        key: the name of its directory in the remote cache (it holds the hash).
        hash: the first 24 hex digits of the SHA-256 of :attr:`stream`.
        check: when the remote side may use its own installed copy instead: None never
            (shipped packages), "" if it is importable there, a version if that one.
        stream: its files, ``path\\nsize\\n`` and the bytes, in path order.
    """

    name: str
    key: str
    hash: str
    check: str | None
    stream: bytes = field(repr=False)

    def request(self) -> dict[str, Any]:
        """This package in the bootstrap's request."""
        return {"name": self.name, "key": self.key, "hash": self.hash, "check": self.check}

    def payload(self) -> bytes:
        """What the bootstrap reads when it needs this package."""
        data = _compressed(self.stream)
        return f"{self.key} {len(data)}\n".encode() + data


_package_cache: dict[tuple[Any, ...], Package] = {}
_package_lock = threading.Lock()


_compressed_cache: dict[bytes, bytes] = {}  # by the stream's SHA-256: compressed once


def _compressed(stream: bytes) -> bytes:
    digest = hashlib.sha256(stream).digest()
    data = _compressed_cache.get(digest)
    if data is None:
        data = _compressed_cache[digest] = zlib.compress(stream, 6)
    return data


def local_package(name: str, check: str | None, *, version: str = "") -> Package:
    """The package (or module) ``name`` as found here, its hash from its files' content.

    Raises:
        StartError: there is no such module here, or it has no files to copy.
    """
    import importlib.util

    top = name.split(".", maxsplit=1)[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError) as exc:
        raise StartError(f"cannot ship {name!r}: {exc}") from None
    if spec is None:
        raise StartError(f"cannot ship {name!r}: there is no module {top!r} here")
    files: list[tuple[str, str]] = []
    if spec.submodule_search_locations:
        root = next(iter(spec.submodule_search_locations))
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for file_name in names:
                if file_name.endswith((".pyc", ".pyo")):
                    continue
                path = os.path.join(folder, file_name)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                files.append((f"{top}/{rel}", path))
    elif spec.origin and os.path.isfile(spec.origin):
        files.append((os.path.basename(spec.origin), spec.origin))
    if not files:
        raise StartError(f"cannot ship {name!r}: it has no files here (a built-in module?)")
    files.sort()
    # Read again only when a file changed (a module edited between two starts).
    stamp = (top, check, tuple((rel, os.stat(path).st_mtime_ns) for rel, path in files))
    with _package_lock:
        known = _package_cache.get(stamp)
    if known is not None:
        return known
    parts = []
    for rel, path in files:
        with open(path, "rb") as f:
            data = f.read()
        parts.append(f"{rel}\n{len(data)}\n".encode() + data)
    stream = b"".join(parts)
    digest = hashlib.sha256(stream).hexdigest()[:24]
    key = f"{top}-{version}-{digest}" if version else f"{top}-{digest}"
    package = Package(top, key, digest, check, stream)
    with _package_lock:
        _package_cache[stamp] = package
    return package


def packages_for(ship: tuple[str, ...]) -> list[Package]:
    """offload itself, cloudpickle (used there only when missing) and the ``ship``
    packages (always from the cache: the local copy is the one wanted).

    psutil is not among them: it is not pure Python. The remote side works without
    it; there, a task's escaped grandchildren are not hunted down (its process group
    still is) unless psutil is installed.

    Raises:
        StartError: a ``ship`` name that is no module here.
    """
    found = [
        local_package("offload", __version__, version=__version__),
        local_package("cloudpickle", ""),
    ]
    seen = {"offload", "cloudpickle"}
    for name in ship:
        top = name.split(".", maxsplit=1)[0]
        if top not in seen:
            seen.add(top)
            found.append(local_package(top, None))
    return found


# -- one remote process over ssh -------------------------------------------------------------


class RemoteLaunch:
    """One entry point started over ssh by the bootstrap, listening on a Unix socket
    that ssh forwards here (see the module documentation, steps 1 to 3).

    Attributes:
        address: ``unix:PATH`` of the forwarded socket here, once started.
        token: the token the remote side checks (bytes, made here unless given).
        child: the ``ssh`` process (a :class:`~offload.process.child.ChildProcess`:
            its stderr tail, exit status, kill), once launched.
        ready_text: what the entry point passed to ``ready`` (``"pid N"`` for a server).
        shipped: the cache keys copied to the remote side by this start.
    """

    def __init__(
        self,
        ssh: SSH,
        entry: str,
        settings: Mapping[str, Any],
        *,
        name: str,
        loop: Loop,
        token: bytes | None = None,
        env: Mapping[str, str] | None = None,
        stderr: str = "prefix",
        stdout: str = "prefix",
        on_exit: Callable[[RemoteLaunch], Any] | None = None,
    ) -> None:
        self.ssh = ssh
        self.entry = entry
        self.settings = dict(settings)
        self.name = name
        self.loop = loop
        self.token = token if token is not None else secrets.token_hex(32).encode()
        self.env = dict(env or {})
        self.stderr = stderr
        self.stdout = stdout
        self.on_exit = on_exit
        self.address = ""
        self.ready_text = ""
        self.shipped: tuple[str, ...] = ()
        self.child: ChildProcess | None = None
        self.killed = False
        self._popen: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._starter: int | None = None  # the thread in start(), which owns stdin
        self._stdin: int | None = None
        self._stdout: int | None = None  # ours until ready, then the child relays it
        self._local_dir: str | None = None
        self._buffer = b""

    def __repr__(self) -> str:
        pid = self.child.pid if self.child is not None else None
        state = (
            "not launched"
            if self.child is None
            else f"exited {self.child.returncode}"
            if self.child.returncode is not None
            else f"ready at {self.address}"
            if self.address
            else "starting"
        )
        return f"<RemoteLaunch {self.entry} on {self.ssh} ssh pid={pid} {state}>"

    @property
    def exited(self) -> bool:
        """Whether the ssh process has exited (and was reaped)."""
        return self.child is not None and self.child.exited.is_set()

    # -- starting -------------------------------------------------------------------------

    def start(self, timeout: float) -> None:
        """Launch ssh and wait until the remote entry point is ready (blocking: not on
        the I/O loop's thread).

        On failure the ssh process has exited and was reaped when this raises.

        Raises:
            StartError: ssh could not run or failed (refused key, unreachable host), the
                remote Python is missing or of another version, the remote side failed,
                or it was not ready within ``timeout`` seconds; the message quotes what
                ssh and the remote side wrote.
        """
        deadline = time.monotonic() + timeout
        # This thread writes to ssh's stdin until the start is over: nobody else closes
        # it meanwhile (a closed fd number may be reused at once by another file).
        self._starter = threading.get_ident()
        try:
            if self.killed:  # ended before it began
                raise outcome.start_failed(
                    f"{self.name} was stopped before ssh started", worker=self.name
                )
            self._launch(deadline)
            self._handshake(deadline, timeout)
        except StartError:
            self._give_up()
            raise
        except BaseException as exc:
            self._give_up()
            raise outcome.start_failed(
                f"could not start {self.name} over ssh: {type(exc).__name__}: {exc}",
                worker=self.name,
            ) from exc
        finally:
            with self._lock:
                self._starter = None
        if self.killed or self.exited:  # ended while it started: the close was put off
            self._release_stdin()

    def _launch(self, deadline: float) -> None:
        packages = packages_for(self.ssh.ship)
        self._packages = {p.key: p for p in packages}
        self._local_dir = tempfile.mkdtemp(prefix="offload-ssh-")
        local = os.path.join(self._local_dir, "s")
        remote = f"{_REMOTE_SOCKET_DIR}/offload-ssh-{secrets.token_hex(8)}/s"
        self._nonce = secrets.token_hex(8)
        argv = ssh_argv(
            self.ssh, remote_python_command(self.ssh.python, LOADER), forward=(local, remote)
        )
        try:
            proc = popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C here is the pool's to handle, not ssh's
            )
        except OSError as exc:
            raise outcome.start_failed(
                f"could not start {self.name}: cannot run ssh: {exc}", worker=self.name
            ) from None
        self._popen = proc
        self._stdin = _take_fd(proc.stdin)
        self._stdout = _take_fd(proc.stdout)
        spec = LaunchSpec(name=self.name, stdout=self.stdout, stderr=self.stderr)
        self.child = ChildProcess(
            proc.pid,
            spec,
            self.loop,
            self._exited,
            stderr_fd=_take_fd(proc.stderr),
            stdout_fd=None,
            reap=self._reap,
        )
        request = {
            "nonce": self._nonce,
            "python": list(sys.version_info[:2]),
            "packages": [p.request() for p in packages],
            "entry": self.entry,
            "settings": self.settings,
            "env": self.env,
            "socket": remote,
            "token": self.token.hex(),
        }
        boot = _bootstrap_source()
        self._local_socket = local
        self._write(b"%d\n" % len(boot) + boot + json.dumps(request).encode() + b"\n", deadline)

    def _handshake(self, deadline: float, timeout: float) -> None:
        marker = f"@offload:{self._nonce} ".encode()
        while True:
            line = self._read_line(deadline)
            if line is None:
                self.terminate()
                raise self._failure(
                    f"was not ready within {timeout:g} s (start_timeout)", wait=True
                )
            if not line:
                raise self._failure("ssh ended before the remote side was ready", wait=True)
            at = line.find(marker)
            if at < 0:
                self._relay_early(line)
                continue
            self._relay_early(line[:at])
            verb, _, text = line[at + len(marker) :].strip().partition(b" ")
            if verb == b"need":
                self._send_packages(text.decode().split(), deadline)
            elif verb == b"error":
                try:
                    message = str(json.loads(text))
                except ValueError:
                    message = text.decode("utf-8", "replace")
                self.terminate()
                raise self._failure(f"the remote side failed: {message}", wait=True)
            elif verb == b"ready":
                self.ready_text = text.decode("utf-8", "replace")
                break
        self.address = f"unix:{self._local_socket}"
        rest, self._buffer = self._buffer, b""
        fd, self._stdout = self._stdout, None
        assert fd is not None and self.child is not None
        self.child.watch_output(fd, self.stdout, initial=rest)

    def _send_packages(self, keys: list[str], deadline: float) -> None:
        for key in keys:
            package = self._packages.get(key)
            if package is None:
                raise self._failure(f"the remote side asked for an unknown package {key!r}")
            self._write(package.payload(), deadline)
        self.shipped += tuple(keys)
        log.info(
            "offload: %s: copied %s into the cache on %s", self.name, ", ".join(keys), self.ssh
        )

    def _failure(self, why: str, *, wait: bool = False) -> StartError:
        """The StartError of a failed start, once ssh's last words are in (``wait``:
        after it exited, bounded)."""
        child = self.child
        if wait and child is not None:
            child.exited.wait(KILL_GRACE + 5.0)
        code = child.returncode if child is not None else None
        status = ""
        if code == 255:
            status = " (ssh exited with status 255: ssh itself failed)"
        elif code == 127:
            status = f" (status 127: {self.ssh.python!r} was not found there)"
        elif code is not None:
            status = f" ({describe_ssh_exit(code)})"
        return outcome.start_failed(
            f"could not start {self.name} on {self.ssh}: {why}{status}",
            worker=self.name,
            exitcode=code if isinstance(code, int) else None,
            stderr_tail=child.stderr_tail() if child is not None else "",
        )

    def _give_up(self) -> None:
        """After a failed start: ssh killed, reaped (bounded wait) and cleaned up."""
        self.terminate()
        child = self.child
        if child is not None:
            child.exited.wait(KILL_GRACE + 5.0)
        else:
            self._cleanup()
        fd, self._stdout = self._stdout, None
        if fd is not None:
            os.close(fd)

    # -- ssh's pipes -----------------------------------------------------------------------

    def _write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        fd = self._stdin
        if fd is None:
            raise self._failure("ssh's stdin is closed")
        os.set_blocking(fd, False)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._failure("ssh did not take its input in time")
            select.select([], [fd], [], remaining)
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                continue
            except OSError as exc:  # ssh is gone: its own words say why
                raise self._failure(f"ssh stopped reading ({exc})", wait=True) from None

    def _read_line(self, deadline: float) -> bytes | None:
        """The next line from ssh's stdout; b"" at its end, None at the deadline."""
        fd = self._stdout
        assert fd is not None
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                continue
            data = os.read(fd, 65536)
            if not data:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def _relay_early(self, data: bytes) -> None:
        """Output the remote side wrote before it was ready: to stderr, ``[name]``
        first (a login script's greeting, a warning of the interpreter)."""
        if not data.strip() or self.stderr == "devnull":
            return
        text = data if data.endswith(b"\n") else data + b"\n"
        prefix = f"[{self.name}] ".encode()
        try:
            os.write(2, b"".join(prefix + line + b"\n" for line in text.splitlines()))
        except OSError:
            pass

    # -- ending ------------------------------------------------------------------------------

    def close(self, grace: float | None = CLOSE_GRACE) -> None:
        """Close ssh's stdin: the remote side ends, and ssh with it; terminate ssh if it
        is still there after ``grace`` seconds (None: never). Any thread; idempotent."""
        deferred = not self._release_stdin()
        child = self.child
        if deferred and child is not None:
            child.terminate()  # still starting: make the start fail now
        elif grace is not None and child is not None and child.returncode is None:
            self.loop.call_soon(lambda: self.loop.call_later(grace, child.terminate))

    def _release_stdin(self) -> bool:
        """Close ssh's stdin, unless the starting thread (another one) writes to it:
        False then (it closes it when the start is over)."""
        with self._lock:
            if self._starter is not None and self._starter != threading.get_ident():
                return False
            fd, self._stdin = self._stdin, None
        if fd is not None:
            os.close(fd)
        return True

    def terminate(self) -> None:
        """End the connection now: ssh's stdin closed, ssh SIGTERMed (SIGKILLed after a
        grace); the remote side ends when its end of the connection does. Any thread."""
        self.killed = True
        self.close(grace=None)
        if self.child is not None:
            self.child.terminate()

    def _reap(self) -> int | None:
        code = reap_pid(self._popen.pid) if self._popen is not None else None
        if code is not None and self._popen is not None:
            self._popen.returncode = code  # reaped: Popen must never wait for it again
        return code

    def _exited(self, child: ChildProcess) -> None:
        """ssh exited (loop thread): clean up here; tell the owner."""
        self._release_stdin()
        self._cleanup()
        if self.on_exit is not None:
            self.on_exit(self)

    def _cleanup(self) -> None:
        directory, self._local_dir = self._local_dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def describe_ssh_exit(code: int | None) -> str:
    """``ssh exited with status 255`` or ``ssh was killed by SIGKILL``."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"ssh was killed by {name}"
    return f"ssh exited with status {code}"


def _take_fd(pipe: Any) -> int:
    """The fd of a Popen pipe, which the Popen object no longer owns."""
    fd = os.dup(pipe.fileno())
    pipe.close()
    return fd


_bootstrap_text: list[bytes] = []


def _bootstrap_source() -> bytes:
    if not _bootstrap_text:
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bootstrap.py")
        with open(path, "rb") as f:
            _bootstrap_text.append(f.read())
    return _bootstrap_text[0]


def start_remote(
    ssh: SSH,
    entry: str,
    settings: Mapping[str, Any],
    *,
    name: str,
    loop: Loop,
    timeout: float = 30.0,
    token: bytes | None = None,
    env: Mapping[str, str] | None = None,
    stderr: str = "prefix",
    stdout: str = "prefix",
    on_exit: Callable[[RemoteLaunch], Any] | None = None,
) -> RemoteLaunch:
    """Start the entry point ``entry`` (``"module:function"``) on ``ssh``'s host with the
    zero-install bootstrap, and return once it listens on its forwarded socket.

    The remote side calls ``function(listen, token, settings, ready)``: ``listen`` is
    ``"unix:PATH"`` (there), ``token`` the bytes it must check (those of the returned
    launch), ``settings`` a JSON-able dict, and ``ready(text)`` must be called once it
    accepts connections. It is killed when the ssh connection ends.

    Blocks: call it on a thread of its own, never on the I/O loop's thread.

    Returns:
        The :class:`RemoteLaunch`: ``.address`` (``"unix:PATH"`` here, for
        :func:`offload.transport.net.connect` and
        :func:`offload.client.remote.authenticate` with ``.token``), ``.child`` (the
        ssh process), ``.ready_text``; ``.close()`` or ``.terminate()`` end it, and
        ``on_exit(launch)`` is called on the loop thread once ssh has exited.

    Raises:
        StartError: see :meth:`RemoteLaunch.start`.
    """
    launch = RemoteLaunch(
        ssh,
        entry,
        settings,
        name=name,
        loop=loop,
        token=token,
        env=env,
        stderr=stderr,
        stdout=stdout,
        on_exit=on_exit,
    )
    launch.start(timeout)
    return launch


# -- the slot ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSHTarget:
    """A worker server to start over ssh for a slot.

    Attributes:
        ssh: the machine.
        workers: the server's worker processes (calls at once); None: its CPU count.
        heartbeat: as for a remote slot.
        preload: modules its workers import at start.
        env: environment variables for the server and its workers.
        entry: the remote entry point (:func:`start_remote`); by default a worker
            server, :func:`offload.server.over_ssh.serve`. An actor over ssh names
            :func:`offload.server.actor_over_ssh.serve`.
        settings: more settings for the entry point (JSON-able).
        token: the token the remote side checks (made for each start when None; an
            actor's is its handle's, which travels).
    """

    ssh: SSH
    workers: int | None = None
    heartbeat: tuple[float, float] = DEFAULT_HEARTBEAT
    preload: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    entry: str = SERVER_ENTRY
    settings: Mapping[str, Any] | None = field(default=None, repr=False)
    token: bytes | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """``ssh://user@host:port``: how its workers are named."""
        return str(self.ssh)


class SSHSlot(RemoteSlot):
    """A worker server started over ssh for one engine slot: a
    :class:`~offload.client.remote.RemoteSlot` to the forwarded socket, plus the ssh
    process, which it ends with the connection (and reports its end only after)."""

    def __init__(self, host: SlotHost, slot: int, gen: int, name: str, target: SSHTarget) -> None:
        self.ssh_target = target
        token = target.token or secrets.token_hex(32).encode()
        placeholder = parse_address(f"unix:/nonexistent/{target.ssh.host}")
        super().__init__(host, slot, gen, name or target.address, RemoteTarget(placeholder, token))
        self.target = replace(self.target, heartbeat=target.heartbeat)
        self.label = self.name  # the prefix of its output (the server renames the slot)
        self.launch: RemoteLaunch | None = None
        self._launched = False
        self._ssh_gone = False
        self._reported = False
        self._channel_info: ExitInfo | None = None

    def __repr__(self) -> str:
        state = "ready" if self.ready else "closing" if self.expected_exit else "starting"
        ssh_pid = self.launch.child.pid if self.launch and self.launch.child else None
        return (
            f"<SSHSlot {self.ssh_target.ssh} server pid={self.server_pid} ssh pid={ssh_pid} "
            f"slot={self.slot} {state}>"
        )

    @property
    def launched(self) -> bool:
        """Whether ssh started the remote side (its end will be reported)."""
        return self._launched

    def output_modes(self) -> tuple[str, str]:
        """Like everything else the remote side prints: ``"inherit"`` gets the name in
        front (``[ssh://gpu1] ...``), as a machine's output should say where it is from."""
        opts = self.host.options
        stdout = "prefix" if opts.stdout == "inherit" else opts.stdout
        stderr = "prefix" if opts.stderr == "inherit" else opts.stderr
        return stdout, stderr

    @property
    def ssh_pid(self) -> int | None:
        """The pid of the local ``ssh`` process, while there is one."""
        launch = self.launch
        child = launch.child if launch is not None else None
        return child.pid if child is not None and child.returncode is None else None

    def start(self) -> None:
        """Start ssh on a thread of its own (loop thread)."""
        if self.expected_exit:  # killed before it started
            self.host.discard(self)
            return
        opts = self.host.options
        target = self.ssh_target
        settings: dict[str, Any] = {"preload": list(target.preload), **(target.settings or {})}
        if target.workers is not None:
            settings["workers"] = target.workers
        self.launch = RemoteLaunch(
            target.ssh,
            target.entry,
            settings,
            name=self.label,
            loop=self.loop,
            token=self.target.token,
            env=target.env,
            stderr="prefix" if opts.stderr == "inherit" else opts.stderr,
            stdout="prefix" if opts.stdout == "inherit" else opts.stdout,
            on_exit=self._ssh_exited,
        )
        threading.Thread(target=self._start_ssh, name="offload-ssh-start", daemon=True).start()

    def _start_ssh(self) -> None:
        launch = self.launch
        assert launch is not None
        try:
            launch.start(self.host.options.start_timeout)
        except StartError as exc:
            self.expected_exit = True
            self._finished = True
            self.loop.call_soon(self.host.start_failed, self, exc)  # not launched: done
            return
        self.loop.call_soon(self._started)

    def _started(self) -> None:
        """The remote server is ready (loop thread): connect, unless the slot was
        killed meanwhile or ssh is gone already."""
        self._launched = True
        launch = self.launch
        assert launch is not None
        if self.expected_exit:  # killed while starting
            self._finished = True
            launch.terminate()
            self._maybe_report()
            return
        if self._ssh_gone:
            self._finished = True
            self._report_start_failure(
                launch._failure("ssh ended as soon as the remote side was ready")
            )
            return
        self.target = replace(self.target, address=parse_address(launch.address))
        threading.Thread(target=self._connect, name="offload-connect", daemon=True).start()

    # -- ending ----------------------------------------------------------------------------

    def _report_start_failure(self, error: BaseException) -> None:
        """The connection failed before its handshake ended: end ssh; the engine hears
        of the end once ssh has exited."""
        self.expected_exit = True
        if self.launch is not None and self.launch.child is not None:
            tail = self.launch.child.stderr_tail()
            if tail and isinstance(error, StartError) and not error.stderr_tail:
                error = outcome.start_failed(str(error), worker=self.label, stderr_tail=tail)
        self.host.start_failed(self, error)
        self._end_ssh(now=True)
        self._maybe_report()

    def _report_exit(self, info: ExitInfo) -> None:
        self._channel_info = info
        self._end_ssh(now=not self.expected_exit)
        self._maybe_report()

    def _ssh_exited(self, launch: RemoteLaunch) -> None:
        """ssh is gone (loop thread): so is the connection through it."""
        self._ssh_gone = True
        if not self._launched:
            return  # the starting thread reports (its start failed, or _started will see)
        channel = self.channel
        if channel is not None and not self._finished:
            channel.abort()  # its close reports the end
        self._maybe_report()

    def _end_ssh(self, *, now: bool) -> None:
        launch = self.launch
        if launch is None:
            return
        if now:
            launch.terminate()
        else:
            launch.close()

    def _maybe_report(self) -> None:
        """Tell the engine this slot ended, once both the connection and ssh are gone."""
        if self._reported or not self._ssh_gone or not self._finished:
            return
        self._reported = True
        launch = self.launch
        child = launch.child if launch is not None else None
        tail = child.stderr_tail() if child is not None else ""
        how = describe_ssh_exit(child.returncode if child is not None else None)
        info = self._channel_info
        if info is None:
            info = ExitInfo(self.name, self.server_pid, None, None, "disconnected", tail, how)
        else:
            detail = info.detail or "lost its ssh connection"
            info = replace(info, stderr_tail=tail, detail=f"{detail} ({how})")
        self.host.process_exited(self, info)

    def kill(self, reason: str = "") -> None:
        """Kill its calls and end the connection and ssh now (the remote server dies
        with the connection)."""
        super().kill(reason)
        self._end_ssh(now=True)

    def stop(self) -> None:
        """Close the connection (its calls are done); the server ends with ssh."""
        super().stop()
        self._end_ssh(now=False)
