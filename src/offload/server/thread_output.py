"""What calls running on this process's own threads print: relayed to their callers.

Theory of operation
-------------------
A worker server's child workers print into pipes that the server reads
(:mod:`offload.server.relay`). Calls that run on threads of the serving process itself
— ``offload serve --isolation inline``, and the listener of an actor or of a worker
whose handle travelled (:mod:`offload.server.host`) — write to that process's own
``sys.stdout`` and ``sys.stderr``, which several calls (of several clients) and the
process itself share. What tells whose a write is, is the thread that makes it:

1. :func:`install` (once, by the process that serves: ``offload serve`` with inline
   isolation, an actor's or a worker's listener in its worker process) replaces
   ``sys.stdout`` and ``sys.stderr`` with :class:`ThreadRouted` streams. On a thread
   that runs no call they write through to the streams they replaced, unchanged.
2. The runner of those calls (:class:`~offload.server.inline.InlineRunner`) marks its
   thread for the time of each call (:func:`routed`): what the call writes there, with
   ``print``, ``sys.stdout.write`` or ``sys.stdout.buffer.write``, goes to the call's
   session as it is written (``RawSink.call_output``), which sends it to the client as
   ``Output`` messages under the client's id, before the call's Result (which the same
   thread sends after the call). The client passes it on with its own ``stdout`` /
   ``stderr`` options, as a worker's (:mod:`offload.client.output`).
3. What this cannot see stays the serving process's own output: writes to the file
   descriptors themselves (``os.write(1, ...)``, C extensions, subprocesses that
   inherit them), and writes from threads the task starts (nothing ties such a thread
   to a call once the call may have ended). Writes by the process outside calls (its
   logs, an actor's creator's calls, which run on the worker's own loop and reach the
   creator through the worker's pipes) are untouched.

Nothing is buffered here: each write is one message (a ``print`` with its newline is
usually two), in the order the call wrote them; the session bounds what waits for a
client that does not read.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from offload import protocol as p
from offload.client.slot import RawSink

_on_thread = threading.local()  # .target: (sink, call id) of the call running here
_install_lock = threading.Lock()


@contextmanager
def routed(sink: RawSink, call_id: int) -> Iterator[None]:
    """What this thread writes to ``sys.stdout``/``sys.stderr`` meanwhile is call
    ``call_id``'s: it goes to ``sink`` (once :func:`install` ran; else nowhere new)."""
    previous = getattr(_on_thread, "target", None)
    _on_thread.target = (sink, call_id)
    try:
        yield
    finally:
        _on_thread.target = previous


def install() -> None:
    """Route the calls' writes from now on: ``sys.stdout`` and ``sys.stderr`` become
    :class:`ThreadRouted` streams over what they are now (idempotent; a stream that is
    None, as under ``pythonw``, is left alone)."""
    with _install_lock:
        for name, stream_id in (("stdout", p.STDOUT), ("stderr", p.STDERR)):
            current = getattr(sys, name)
            if current is not None and not isinstance(current, ThreadRouted):
                setattr(sys, name, ThreadRouted(current, stream_id))


class ThreadRouted:
    """A text stream that writes a call's text to its caller and anything else to the
    stream it wraps (see the module docstring). Everything but writing and flushing is
    the wrapped stream's (``encoding``, ``fileno()``, ``isatty()``, ...).

    Args:
        stream: the stream it replaces.
        stream_id: ``protocol.STDOUT`` or ``protocol.STDERR``.
    """

    def __init__(self, stream: Any, stream_id: int) -> None:
        self.wrapped = stream
        self.stream_id = stream_id
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._buffer = _BinaryRouted(self)

    def __repr__(self) -> str:
        return f"<ThreadRouted {self.wrapped!r}>"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def write(self, text: str) -> int:
        """Write ``text``: to the caller of the call running on this thread, if any.

        Raises:
            TypeError: ``text`` is not a str.
            Whatever the wrapped stream's ``write`` raises (outside calls).
        """
        target = getattr(_on_thread, "target", None)
        if target is None:
            return int(self.wrapped.write(text))
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            sink, call_id = target
            sink.call_output(call_id, self.stream_id, text.encode(self._encoding, "replace"))
        return len(text)

    def writelines(self, lines: Any) -> None:
        """Write each of ``lines``."""
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Flush the wrapped stream (a call's writes are sent as they are made)."""
        if getattr(_on_thread, "target", None) is None:
            self.wrapped.flush()

    @property
    def buffer(self) -> Any:
        """The binary stream beneath (``sys.stdout.buffer``), routed the same way."""
        return self._buffer


class _BinaryRouted:
    """``sys.stdout.buffer`` of a :class:`ThreadRouted` stream."""

    def __init__(self, text: ThreadRouted) -> None:
        self._text = text

    def __getattr__(self, name: str) -> Any:
        return getattr(self._text.wrapped.buffer, name)

    def write(self, data: Any) -> int:
        """Write bytes: to the caller of the call running on this thread, if any.

        Raises:
            Whatever the wrapped binary stream's ``write`` raises (outside calls).
        """
        target = getattr(_on_thread, "target", None)
        if target is None:
            return int(self._text.wrapped.buffer.write(data))
        chunk = bytes(data)
        if chunk:
            sink, call_id = target
            sink.call_output(call_id, self._text.stream_id, chunk)
        return len(chunk)

    def flush(self) -> None:
        """Flush the wrapped binary stream (outside calls)."""
        if getattr(_on_thread, "target", None) is None:
            self._text.wrapped.buffer.flush()
