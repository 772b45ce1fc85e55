"""A real, throw-away ``sshd`` on 127.0.0.1 for the ssh tests and the ssh benchmark (an
importable module, not a test file).

:func:`make_keys` writes a host key and a client key (``ssh-keygen``, ed25519) into a
directory; :class:`SSHD` runs ``/usr/sbin/sshd -D -e -f CONFIG`` with its own
configuration in that directory: loopback only, public-key login only, the keys and
``authorized_keys`` of that directory, ``StrictModes no``, ``UsePAM no``, its pid file
there, and the lines of its ``extra_config`` (e.g. ``SetEnv``). Nothing of the system's
configuration is read or changed; the one thing outside the directory is ``/run/sshd``,
the empty privilege-separation directory sshd refuses to start without when run as root,
made if missing (as the package's service would).

The client side (:meth:`SSHD.ssh`) gets ``-F /dev/null`` (no user or system ssh
configuration), a known-hosts file holding exactly this server's key with
``StrictHostKeyChecking=yes``, and the client key: never the user's ``~/.ssh``.

:meth:`SSHD.stop` waits (bounded) for the sessions to end on their own (their clients
are gone when a test ended cleanly), kills and reports those that did not, then stops
the listener and reaps it; sshd reaps its own session processes.

:func:`python_wrapper` writes an executable script to use as ``SSH(python=...)``: it sets
the remote side's cache directory (``XDG_CACHE_HOME``) into the test's directory, may
print something first, and runs an interpreter, with ``-S`` for one where offload (and
site-packages) cannot be imported: "offload is not installed there".

The fixtures ``ssh_keys`` and ``sshd`` (in ``conftest.py``) make the keys once a session
and start an :class:`SSHD` a test. :func:`ssh_children` and :func:`wait_gone` check that
nothing is left behind: the "remote" machine is this one.
"""

from __future__ import annotations

import os
import select
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from offload import SSH

SSHD_BIN = "/usr/sbin/sshd"
START_LIMIT = 15.0  # seconds sshd has to say it listens
SESSION_GRACE = 10.0  # seconds sessions get to end by themselves at stop
# Why a test that needs sshd is skipped without one (``skipif(not have_sshd(), ...)``).
MISSING = "needs /usr/sbin/sshd and ssh (Debian: apt-get install openssh-server openssh-client)"


def have_sshd() -> bool:
    """Whether the ``openssh-server`` package's sshd and the ssh client are installed."""
    import shutil

    return os.access(SSHD_BIN, os.X_OK) and shutil.which("ssh") is not None


def make_keys(directory: Path) -> None:
    """A host key, a client key, an ``authorized_keys`` with the client key, and a second
    client key that is not authorised (``other_key``)."""
    for name in ("host_key", "client_key", "other_key"):
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                name,
                "-f",
                str(directory / name),
            ],
            check=True,
            stdin=subprocess.DEVNULL,
        )
    (directory / "authorized_keys").write_bytes((directory / "client_key.pub").read_bytes())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SSHD:
    """One sshd on 127.0.0.1 (see the module documentation)."""

    def __init__(self, keys: Path, directory: Path, extra_config: Sequence[str] = ()) -> None:
        self.keys = keys
        self.directory = directory
        self.extra_config = tuple(extra_config)  # more sshd_config lines, e.g. "SetEnv ..."
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None
        self.user = psutil.Process().username()
        self.known_hosts = directory / "known_hosts"

    def start(self) -> SSHD:
        """Start sshd on a free port (another try if the port was taken meanwhile).

        Raises:
            RuntimeError: sshd did not start.
        """
        try:  # needed by an sshd run as root (privilege separation); harmless otherwise
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        except OSError:
            pass  # not root: sshd runs without privilege separation and does not need it
        for _ in range(3):
            self.port = _free_port()
            if self._start_once():
                host_key = (self.keys / "host_key.pub").read_text().split()
                self.known_hosts.write_text(
                    f"[127.0.0.1]:{self.port} {host_key[0]} {host_key[1]}\n"
                )
                return self
        raise RuntimeError("sshd did not start:\n" + "\n".join(self.log[-20:]))

    def _start_once(self) -> bool:
        config = self.directory / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.keys / 'host_key'}",
                    f"AuthorizedKeysFile {self.keys / 'authorized_keys'}",
                    f"PidFile {self.directory / 'sshd.pid'}",
                    "StrictModes no",
                    "UsePAM no",
                    "PermitRootLogin yes",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "AllowStreamLocalForwarding yes",
                    "PrintMotd no",
                    "UseDNS no",
                    "LogLevel INFO",
                    *self.extra_config,
                    "",
                ]
            )
        )
        self._listening.clear()
        self.proc = subprocess.Popen(
            [SSHD_BIN, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read_log, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_LIMIT
        while not self._listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._end_listener()
                return False
        return True

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.log.append(line)
            if "Server listening on" in line:
                self._listening.set()
        proc.stderr.close()

    def ssh(self, **fields: object) -> SSH:
        """An :class:`offload.SSH` for this server (fields override the defaults)."""
        options = (
            "-F",
            "/dev/null",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
        )
        settings: dict[str, object] = {
            "user": self.user,
            "port": self.port,
            "identity": str(self.keys / "client_key"),
            "ssh_options": options,
        }
        settings.update(fields)
        return SSH("127.0.0.1", **settings)  # type: ignore[arg-type]

    def ssh_argv(self, *command: str) -> list[str]:
        """A plain ``ssh`` command line to this server (for the benchmark's baseline)."""
        ssh = self.ssh()
        return [
            "ssh",
            *ssh.ssh_options,
            "-o",
            "BatchMode=yes",
            "-T",
            "-p",
            str(self.port),
            "-l",
            self.user,
            "-i",
            str(ssh.identity),
            "127.0.0.1",
            shlex.join(command),
        ]

    def sessions(self) -> list[psutil.Process]:
        """Everything sshd runs now (its session processes and what they started)."""
        if self.proc is None:
            return []
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self) -> list[str]:
        """Stop sshd; return descriptions of the session processes that had to be killed
        (a clean test leaves none)."""
        left = []
        procs = self.sessions()
        if procs:
            _gone, alive = psutil.wait_procs(procs, timeout=SESSION_GRACE)
            for proc in alive:
                try:
                    left.append(f"pid {proc.pid}: {' '.join(proc.cmdline())}")
                    proc.kill()  # sshd (their parent, or init) reaps them
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=5.0)
        self._end_listener()
        return left

    def _end_listener(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        self.proc = None


def python_wrapper(
    path: Path,
    cache: Path,
    *,
    python: str = sys.executable,
    isolated: bool = False,
    say: str = "",
) -> str:
    """Write an executable script that runs ``python`` with the remote cache in
    ``cache``: with ``isolated``, the base interpreter (not this virtualenv's) with
    ``-S``, which cannot import offload, cloudpickle or psutil; ``say`` is printed on
    stdout and stderr first (a chatty login). Returns its path."""
    if isolated:
        python = getattr(sys, "_base_executable", "") or python
    flags = " -S" if isolated else ""
    lines = ["#!/bin/sh", f"export XDG_CACHE_HOME={shlex.quote(str(cache))}"]
    if say:
        lines += [f"echo {shlex.quote(say)}", f"echo {shlex.quote(say)} >&2"]
    lines.append(f'exec {shlex.quote(python)}{flags} "$@"')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return str(path)


def ssh_children() -> list[psutil.Process]:
    """The ssh clients this process runs now."""
    return [p for p in psutil.Process().children() if p.name() == "ssh"]


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait (on pidfds, no polling) until every process has ended (exited, zombies
    included); the pids still running at the deadline."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    try:
        waiting = set(fds)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select(list(waiting), [], [], remaining)
            waiting -= set(ready)
        return sorted(fds[fd] for fd in waiting)
    finally:
        for fd in fds:
            os.close(fd)
