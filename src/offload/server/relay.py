"""What a worker server's child workers print: relayed to the client whose call printed it.

Theory of operation
-------------------
1. The server's workers are :class:`RelayingSlot` s, local slots whose stdout is read
   through a pipe whatever the ``stdout`` option (stderr always is). Every chunk read
   from either pipe is offered to :meth:`RelayingSlot.relay` first, on the I/O loop.
2. :meth:`RelayingSlot.relay` asks the engine which calls that process runs now
   (:meth:`Engine.running_calls <offload.client.engine.Engine.running_calls>`: the first
   ``concurrency`` of those sent to it, since a worker runs its calls in order). When
   they are all one session's (always, with the default ``concurrency=1``), the chunk
   goes to that session (:meth:`Session.call_output
   <offload.server.session.Session.call_output>`), which sends it as an
   :class:`~offload.protocol.Output` message under the client's id of the oldest of them.
   Otherwise it is the server's own output, written as its ``stdout``/``stderr``
   options say: what a worker prints outside any call (start-up, ``preload``), and
   what it prints while it runs calls of several clients at once (a worker server
   with ``concurrency > 1``): nothing tells whose it is, and one client never gets
   another's output.
3. A worker flushes ``sys.stdout`` and ``sys.stderr`` before it sends a call's Result.
   So before the results read from a worker are handled, its pipes are read to the end
   (:meth:`ChildProcess.drain_output <offload.process.child.ChildProcess.drain_output>`):
   what the call printed is relayed under its id, and reaches the client before its
   Result, on the same connection. Then the stderr tail starts afresh, so a crash
   report (``WorkerCrashed.stderr_tail``) holds what the crashing call wrote, never
   what an earlier call (perhaps another client's) wrote.
4. Only a call sent ahead to a worker (tiny calls are pipelined) and printing the very
   moment it starts can have its first bytes read with the end of the call before it,
   and relayed as that call's: the pipes and the socket are separate, so nothing orders
   the two exactly.

The session bounds what it keeps for a client that does not read (see
:meth:`Session.call_output <offload.server.session.Session.call_output>`); reading the
pipes never waits for a client, so a flood of output never holds up a call.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, cast

from offload import protocol as p
from offload.client.local import LocalSlot

if TYPE_CHECKING:
    from offload.client.engine import Engine

log = logging.getLogger("offload")


class RelayingSlot(LocalSlot):
    """A worker process of a server's engine, whose output goes to the clients whose
    calls print it (see the module docstring). Built by the engine like a
    :class:`~offload.client.local.LocalSlot`; its host must be an
    :class:`~offload.client.engine.Engine`."""

    pipe_stdout = True
    # No shared memory with a server's workers: a server must come back to its baseline
    # of descriptors once a burst of large results is gone, and on this hop a copy
    # through the socket costs little next to the network's.
    shared_memory = 0

    def start(self) -> None:
        """Launch the process (loop thread) and take its output first."""
        super().start()
        # Set on the loop thread right after the launch: the pipes are read on this
        # thread too, so no chunk is read before the hook is in place.
        if self.child is not None:
            self.child.output_hook = self.relay

    def relay(self, stream: int, data: bytes) -> bool:
        """Hand a chunk of output to the session of the call that printed it; False
        when it is nobody's (the server writes it to its own stdout/stderr)."""
        engine = cast("Engine", self.host)  # a server's slots are an engine's
        try:
            records = engine.running_calls(self.slot, self.gen)
            sink = records[0].sink if records else None
            if sink is None or any(record.sink is not sink for record in records):
                return False
            sink.call_output(records[0].call_id, stream, data)
        except Exception:  # never lose the loop over a chunk of output
            log.exception("offload: relaying the output of worker %s failed", self.name)
            return False
        return True

    def _handle_messages(self, msgs: list[p.Message]) -> None:
        child = self.child
        if child is None or not any(type(msg) is p.Result for msg in msgs):
            super()._handle_messages(msgs)
            return
        # What the finished calls printed is in the pipes already (flushed before their
        # Results were sent): it goes out first, under their ids.
        if self.loop.in_loop():
            child.drain_output()
        super()._handle_messages(msgs)
        child.forget_tail()
