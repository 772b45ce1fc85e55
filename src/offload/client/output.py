"""A remote call's output, on the caller's side: :class:`RelayedOutput`.

A worker server sends what the process running a call writes as
:class:`~offload.protocol.Output` messages (see :mod:`offload.server.relay`), on the
connection that carries the call, before its Result. The remote slot hands each one to
its :class:`RelayedOutput`, which passes the bytes on as the caller's ``stdout`` and
``stderr`` options say, with the same sinks as a local worker's output
(:data:`offload.process.child.OutputSink`): ``"inherit"`` writes them to this process's
own stdout/stderr, ``"devnull"`` drops them, a path appends them to that file, and
``"prefix"`` writes each line with ``[name] `` before it.

Order: the bytes of one stream come out in the order the task wrote them (one
connection, one reader at a time). Lines: in ``prefix`` mode each call keeps its own
unfinished line, so the output of calls running at once on the server's workers never
splices two lines together; the unfinished line of a call is written out when its
Result arrives. Memory: nothing is queued here, and an unfinished line is cut into
pieces of at most 64 KiB.
"""

from __future__ import annotations

import logging

from offload import protocol as p
from offload.process.child import OutputSink

log = logging.getLogger("offload")


class RelayedOutput:
    """Where one remote slot's relayed output goes.

    Args:
        stdout: the caller's ``stdout`` option (``"inherit"``, ``"devnull"``,
            ``"prefix"`` or a path).
        stderr: the caller's ``stderr`` option.

    Used on whichever thread reads the connection, one at a time.
    """

    def __init__(self, stdout: str, stderr: str) -> None:
        self.modes = {p.STDOUT: stdout, p.STDERR: stderr}
        self._shared: dict[int, OutputSink] = {}  # stream -> its sink (no line state)
        self._lines: dict[tuple[int, int], OutputSink] = {}  # (call, stream) -> prefix sink

    def __repr__(self) -> str:
        return (
            f"<RelayedOutput stdout={self.modes[p.STDOUT]!r} stderr={self.modes[p.STDERR]!r} "
            f"unfinished lines={len(self._lines)}>"
        )

    def write(self, msg: p.Output, name: str) -> None:
        """Pass on the bytes of one Output message; ``name`` is the worker's, for
        ``prefix``. A stream the protocol does not know is ignored; a sink that fails
        (a file that cannot be opened) is logged, never raised."""
        mode = self.modes.get(msg.stream)
        if mode is None or mode == "devnull":
            return
        try:
            if mode == "prefix":
                key = (msg.call_id, msg.stream)
                sink = self._lines.get(key)
                if sink is None:
                    sink = self._lines[key] = OutputSink(mode, name, msg.stream)
            else:
                sink = self._shared.get(msg.stream)
                if sink is None:
                    sink = self._shared[msg.stream] = OutputSink(mode, name, msg.stream)
            sink.write(msg.data)
        except OSError as exc:
            log.warning("offload: could not pass on the output of %s: %s", name, exc)

    def call_ended(self, call_id: int) -> None:
        """The call's Result arrived: write out its unfinished lines."""
        if not self._lines:
            return
        for stream in (p.STDOUT, p.STDERR):
            sink = self._lines.pop((call_id, stream), None)
            if sink is not None:
                _close(sink)

    def close(self) -> None:
        """The connection ended: write out every unfinished line, close the files."""
        sinks = [*self._lines.values(), *self._shared.values()]
        self._lines.clear()
        self._shared.clear()
        for sink in sinks:
            _close(sink)


def _close(sink: OutputSink) -> None:
    try:
        sink.close()
    except OSError as exc:
        log.warning("offload: could not pass on relayed output: %s", exc)
