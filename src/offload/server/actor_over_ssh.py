"""The entry point of an actor started over ssh (``MyActor.options(where=offload.SSH(...))``).

Theory of operation
-------------------
1. The creator starts this entry with :func:`offload.client.ssh.start_remote`'s
   machinery (an :class:`~offload.client.ssh.SSHSlot` whose target names
   :data:`ENTRY`): the bootstrap calls :func:`serve` with the Unix socket ssh forwards to
   the creator, the handle's token, and the settings: the pickled
   :class:`~offload.server.host.ActorStart` (hex, with its out-of-band buffers), the
   modules to preload and, for ``shutdown_on="heartbeat_timeout"``, the heartbeat.
2. :func:`serve` runs the user's initializer, builds the instance and hosts it with a
   :class:`~offload.server.host.Host`: the very listener ``Actor.serve`` and a spawned
   actor's holders use (inline calls on threads of this process, one gate of
   ``concurrency`` permits). Every client, the creator included, is a connection to it
   (through the forwarded socket). Then it says ready with its pid.
3. It returns (and the bootstrap, then ssh, exit) when the host stops: a holder's or the
   creator's ``shutdown()`` (the calls received finish first) or ``kill()`` (at once:
   calls still running on its threads end with the process). The ssh connection
   ending (the creator's ``kill()``, its exit, a dropped network) ends it at once: the
   bootstrap kills the process group on end of file.
4. ``heartbeat_timeout``: the creator's connection is the first one (a handle exists
   only once the creator's connection is up) and sends a ping every interval; when
   nothing has come from it for the timeout, the actor ends.

Runs on the remote machine.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from offload.serde import loads
from offload.server.host import ActorStart, Host, make_gate
from offload.worker.actor import set_process_actor

ENTRY = "offload.server.actor_over_ssh:serve"
"""How the client names :func:`serve` to the bootstrap."""

EXIT_START_FAILED = 1
EXIT_KILLED = 3  # calls were still running on the host's threads: the process ends them


class _CreatorWatch(Host):
    """A host that notes when the first client (the creator) last sent anything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_seen = time.monotonic()
        self._watching = False

    def _start_session(self, conn: Any, sealer: Any, leftover: bytes) -> None:
        super()._start_session(conn, sealer, leftover)
        if self._watching:
            return
        sessions = self._registered()
        if len(sessions) != 1:
            return
        self._watching = True
        channel = sessions[0].channel
        inner = channel.on_messages

        def seen(msgs: Any) -> None:
            self.last_seen = time.monotonic()
            inner(msgs)

        channel.on_messages = seen
        self.last_seen = time.monotonic()


def decode_start(settings: dict[str, Any]) -> ActorStart:
    """The :class:`ActorStart` the creator put in ``settings`` (see :func:`encode_start`).

    Raises:
        Exception: whatever unpickling raises (a class this side cannot import).
    """
    buffers = [bytes.fromhex(b) for b in settings.get("buffers") or ()]
    start = loads(bytes.fromhex(settings["start"]), buffers)
    if not isinstance(start, ActorStart):
        raise TypeError(f"the settings hold a {type(start).__name__}, not an ActorStart")
    return start


def serve(listen: str, token: bytes, settings: dict[str, Any], ready: Callable[[str], Any]) -> int:
    """Host the actor described by ``settings`` on ``listen`` until it is shut down or
    killed through a handle (or the bootstrap kills this process: the ssh connection
    ended).

    Args:
        listen: ``unix:PATH``.
        token: the actor's token (its handles carry it).
        settings: ``start`` (hex of the pickled :class:`ActorStart`), ``buffers``,
            ``preload`` (modules to import first), ``heartbeat`` (``[interval,
            timeout]``: end when the creator has been silent that long; absent: never).
        ready: called with ``"pid N"`` once clients may connect.

    Returns:
        0 once shut down; 1 if the actor could not start (its traceback on stderr,
        which the creator's ``StartError`` quotes).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("offload").addHandler(handler)
    name = "actor"
    try:
        for module in settings.get("preload") or ():
            importlib.import_module(module)
        start = decode_start(settings)
        name = start.name
        if start.initializer is not None:
            start.initializer(*start.initargs)
        instance = start.cls(*start.args, **start.kwargs)
        set_process_actor(instance)
        host = _CreatorWatch(
            listen,
            token=token,
            name=start.name,
            concurrency=start.concurrency,
            gate=make_gate(start.concurrency),
            max_message_size=start.max_message_size,
            instance=instance,
        )
        host.start()
    except Exception:  # noqa: BLE001 - reported to the creator, whatever it is
        print(
            f"offload: actor {name} could not start:\n{traceback.format_exc()}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_START_FAILED
    ready(f"pid {os.getpid()}")
    heartbeat = settings.get("heartbeat")
    if heartbeat:
        interval, timeout = float(heartbeat[0]), float(heartbeat[1])
        while not host.stopped.wait(interval):
            silent = time.monotonic() - host.last_seen
            if silent > timeout:
                print(
                    f"offload: actor {name}: its creator sent nothing for {silent:.0f} s "
                    f"(shutdown_on='heartbeat_timeout', timeout {timeout:g} s); ending",
                    file=sys.stderr,
                    flush=True,
                )
                threading.Thread(target=host.stop, args=(0.0,), daemon=True).start()
                host.stopped.wait()
    else:
        host.stopped.wait()
    if host.inline_running:
        # Calls still run on the host's threads, which the interpreter would wait for
        # at exit: ending the process is the only way to end them (a kill).
        sys.stderr.flush()
        os._exit(EXIT_KILLED)
    return 0


def encode_start(start: ActorStart) -> dict[str, Any]:
    """``start`` as JSON-able settings for :func:`serve` (the creator's side).

    Raises:
        Exception: whatever pickling raises (the caller reports it).
    """
    from offload.serde import dumps

    data, buffers = dumps(start)
    return {"start": data.hex(), "buffers": [bytes(b).hex() for b in buffers]}
