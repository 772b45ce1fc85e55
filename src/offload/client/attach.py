"""A worker started by hand (``start_method="attach"``): :class:`AttachSlot`.

For debugging a worker where offload cannot start it for you: in another terminal, under
``gdb`` or ``pdb``, with ``strace``, in a container. Instead of launching a process, the
slot waits for one to connect:

1. It listens on ``127.0.0.1`` (a fresh port) and writes, in a fresh 0700 directory, a
   fresh random token (file ``token``, 0600) and the worker's settings (file
   ``settings``: its name, ``concurrency``, ``preload``, ``sys.path``, ...).
2. It prints on stderr (and logs) the command to run, e.g.
   ``python -m offload.worker --connect 127.0.0.1:40123 --token-file /tmp/offload-attach-x/token``
   (:mod:`offload.worker.attach`), and waits ``start_timeout`` seconds for it.
3. The worker connects and both prove the token (:mod:`offload.protocol.auth`, the worker
   server's handshake: nothing is unpickled on either side before it); a connection that
   fails the proof is dropped and the slot goes on waiting. The first that passes is the
   worker: the listener closes and the directory (token and settings) is removed, so a
   command runs one worker once.
4. From there it is a local worker like any other (:class:`~offload.client.local.LocalSlot`:
   the Hello, the initializer, calls, results), over that connection, sealed as a worker
   server's is.

What differs: the process is not offload's child. Its end is the end of its connection
(``WorkerCrashed(reason="disconnected")``; its exit status and stderr are in its own
terminal), killing it closes the connection (the worker then dies, as it does when its
parent goes), and ``env``, ``cwd``, ``umask``, ``python``, ``stdout``, ``stderr``,
``heartbeat`` and ``memory_limit`` do not apply: whoever starts it decides those (a
worker paused in a debugger must not be killed for missing heartbeats anyway).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING

from offload import protocol as p
from offload.client import outcome
from offload.client.local import LocalSlot
from offload.client.options import settings_for_worker
from offload.client.slot import ExitInfo, SlotHost
from offload.errors import AuthenticationError, OffloadError, ProtocolError, StartError
from offload.tokens import write_new_private_file
from offload.transport.channel import Channel
from offload.transport.net import server_handshake
from offload.worker.settings import encode_settings

if TYPE_CHECKING:
    from offload.protocol.auth import Sealer

log = logging.getLogger("offload")
HANDSHAKE_TIMEOUT = 10.0  # seconds a connection gets to prove the token


class AttachSlot(LocalSlot):
    """A slot whose worker a human starts, then connects (see the module documentation).

    Shares :class:`~offload.client.local.LocalSlot`'s handling of the worker's messages;
    what touches a process (launch, exit, kill, memory) is replaced by the connection.
    """

    def __init__(self, host: SlotHost, slot: int, gen: int, name: str) -> None:
        super().__init__(host, slot, gen, name)
        self.command = ""  # what to run to start the worker (once listening)
        self._listener: socket.socket | None = None
        self._directory: str | None = None
        self._ended = False  # its end (or failure to start) was reported

    def __repr__(self) -> str:
        state = "ready" if self.ready else "exiting" if self.expected_exit else "waiting"
        return f"<AttachSlot {self.name} pid={self.pid} slot={self.slot} gen={self.gen} {state}>"

    @property
    def pid(self) -> int | None:
        """The pid the worker gave in its Hello (in its own pid namespace), once attached."""
        channel = self.channel
        peer = channel.conn.peer if channel is not None else None
        return peer.pid if peer is not None else None

    @property
    def local_pid(self) -> None:
        """None: the process is not offload's to signal (it may live in a container)."""
        return None

    @property
    def alive(self) -> bool:
        """Whether the worker is connected."""
        return self.channel is not None and not self.channel.closed

    @property
    def launched(self) -> bool:
        """Whether a worker connected (its end will be reported)."""
        return self.channel is not None

    def rss(self) -> int:
        """0: the process is not offload's to measure."""
        return 0

    # -- waiting for the worker ----------------------------------------------------------

    def start(self) -> None:
        """Listen, print the command to run, and wait for it on a thread of its own."""
        if self.expected_exit:  # killed before it started waiting
            self.host.discard(self)
            return
        opts = self.host.options
        try:
            token = os.urandom(32).hex().encode()
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(4)
            self._listener = listener
            directory = self._directory = tempfile.mkdtemp(prefix="offload-attach-")  # 0700
            token_path = write_new_private_file(os.path.join(directory, "token"), token + b"\n")
            settings = settings_for_worker(opts).replace(
                name=self.name, sys_path=tuple(entry for entry in sys.path if entry)
            )
            write_new_private_file(
                os.path.join(directory, "settings"), encode_settings(settings).encode() + b"\n"
            )
        except OSError as exc:
            self._cleanup()
            self._report_start_failure(
                outcome.start_failed(
                    f"worker {self.name} could not wait for a worker started by hand: {exc}",
                    worker=self.name,
                )
            )
            return
        port = listener.getsockname()[1]
        self.command = (
            f"{shlex.quote(opts.python)} -m offload.worker --connect 127.0.0.1:{port} "
            f"--token-file {shlex.quote(token_path)}"
        )
        print(
            f"offload: worker {self.name} waits {opts.start_timeout:g} s (start_timeout) to "
            f"be started by hand; run:\n    {self.command}",
            file=sys.stderr,
            flush=True,
        )
        log.info("offload: worker %s waits to be started by hand: %s", self.name, self.command)
        deadline = time.monotonic() + opts.start_timeout
        threading.Thread(
            target=self._wait_for_worker,
            args=(listener, token, deadline),
            name=f"offload-attach-{self.name}",
            daemon=True,
        ).start()

    def _wait_for_worker(self, listener: socket.socket, token: bytes, deadline: float) -> None:
        """Accept connections until one proves the token (or the deadline, or a kill)."""
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                listener.settimeout(remaining)
                sock, _ = listener.accept()
                try:
                    # Bounded apart from the deadline: a connection that stalls in its
                    # handshake must not keep the real worker out for long.
                    timeout = min(remaining, HANDSHAKE_TIMEOUT)
                    sealer, leftover = server_handshake(sock, token, timeout, sealed=True)
                except (AuthenticationError, ProtocolError, OSError) as exc:
                    sock.close()  # not our worker: wait on for it
                    log.warning("offload: worker %s: a connection was refused: %s", self.name, exc)
                    continue
                break
        except (TimeoutError, OSError) as exc:  # the deadline, or closed by kill()
            self._cleanup()
            if self.expected_exit:
                self.loop.call_soon(self.host.discard, self)
                return
            self._ended = True
            self.expected_exit = True
            error = outcome.start_failed(
                f"no worker started by hand connected to worker {self.name} within "
                f"{self.host.options.start_timeout:g} s (start_timeout); the command was: "
                f"{self.command}" + ("" if isinstance(exc, TimeoutError) else f" ({exc})"),
                worker=self.name,
            )
            self.loop.call_soon(self._report_start_failure, error)
            return
        self._cleanup()  # one worker per token: nobody else attaches with it
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.loop.call_soon(self._attached, sock, sealer, leftover)

    def _cleanup(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        directory, self._directory = self._directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def _report_start_failure(self, error: OffloadError) -> None:
        self.host.start_failed(self, error)

    def _attached(self, sock: socket.socket, sealer: Sealer | None, leftover: bytes) -> None:
        """A worker proved the token (loop thread): talk to it as to a local worker."""
        if self.expected_exit:  # killed meanwhile
            sock.close()
            self.host.discard(self)
            return
        opts = self.host.options
        conn = p.Connection(
            "client", name=self.host.label, pid=os.getpid(), max_message_size=opts.max_message_size
        )
        conn.sealer = sealer
        self.channel = Channel(sock, conn, self.loop)
        self.channel.on_messages = self._on_messages
        self.channel.on_close = self._on_attached_close
        self.channel.start(initial=leftover)
        self._timers.append(self.loop.call_later(opts.start_timeout, self._start_timed_out))
        log.info("offload: a worker started by hand attached as %s", self.name)

    # -- ending ----------------------------------------------------------------------------

    def _protocol_violation(self, exc: BaseException) -> None:
        self.protocol_error = exc
        self.kill_reason = ""
        if self.channel is not None:
            self.channel.abort()

    def stop(self) -> None:
        """Ask the worker to exit once its calls are done; or stop waiting for a worker
        that has not connected yet."""
        if self.channel is None:
            self.expected_exit = True
            self._stop_waiting()
        else:
            super().stop()

    def kill(self, reason: str = "") -> None:
        """Close the connection (the worker dies when it sees it close); or stop waiting
        for a worker that has not connected yet."""
        self.expected_exit = True
        self.kill_reason = reason
        channel = self.channel
        if channel is not None:
            self.loop.call_soon(channel.abort)
        else:
            self._stop_waiting()

    def _stop_waiting(self) -> None:
        listener = self._listener
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the waiting accept()
            except OSError:
                pass
        # The token goes now, not when the waiting thread gets to it: at interpreter
        # exit, that daemon thread may never run again.
        directory, self._directory = self._directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def _on_attached_close(self, error: BaseException | None) -> None:
        """The connection ended (loop thread): the worker is gone, as far as we know."""
        if self._ended:
            return
        self._ended = True
        for timer in self._timers:
            timer.cancel()
        if not self.ready and not self.expected_exit:
            self.expected_exit = True
            if isinstance(error, OffloadError):
                cause: OffloadError = error
            else:
                cause = StartError(
                    f"the worker started by hand for {self.name} (pid {self.pid}) closed its "
                    "connection before finishing its handshake",
                    worker=self.name,
                    pid=self.pid,
                )
            self.host.start_failed(self, cause)
        if error is not None and self.protocol_error is None:
            self.protocol_error = error
        detail = self._exit_detail(None) or (
            "closed its connection (it was started by hand: how it ended is in its own terminal)"
        )
        log_fn = log.info if self.expected_exit else log.warning
        log_fn("offload: worker %s (started by hand, pid %s) %s", self.name, self.pid, detail)
        self.host.process_exited(
            self,
            ExitInfo(
                name=self.name,
                pid=self.pid,
                exitcode=None,
                signal=None,
                reason="disconnected",
                stderr_tail="",
                detail=detail,
                stderr_seen=False,
            ),
        )
