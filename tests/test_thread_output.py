"""``offload.server.thread_output``: the streams that send what a call writes on its
thread to the call's session, and anything else to the stream they wrap. No process,
no socket: a sink records what it is given.
"""

from __future__ import annotations

import io
import threading

from offload import protocol as p
from offload.server.thread_output import ThreadRouted, routed


class Sink:
    """Stands for a session: records ``call_output``."""

    def __init__(self) -> None:
        self.got: list[tuple[int, int, bytes]] = []

    def call_output(self, call_id: int, stream: int, data: bytes) -> None:
        self.got.append((call_id, stream, data))


class TextBuffer(io.TextIOWrapper):
    """A text stream over a BytesIO, with its ``buffer``."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="utf-8", write_through=True)

    def value(self) -> bytes:
        return self.buffer.getvalue()  # type: ignore[attr-defined,no-any-return]


def test_a_calls_writes_go_to_its_sink_and_everything_else_through() -> None:
    wrapped = TextBuffer()
    out = ThreadRouted(wrapped, p.STDOUT)
    sink = Sink()
    print("before", file=out)  # no call on this thread: through
    with routed(sink, 7):  # type: ignore[arg-type]
        print("in the call", file=out)
        out.buffer.write(b"raw bytes\n")
        out.writelines(["a\n", "b\n"])
        out.flush()
        other = threading.Thread(target=print, args=("another thread",), kwargs={"file": out})
        other.start()
        other.join()
    print("after", file=out)
    assert b"".join(data for _, _, data in sink.got) == b"in the call\nraw bytes\na\nb\n"
    assert {(call, stream) for call, stream, _ in sink.got} == {(7, p.STDOUT)}
    assert wrapped.value() == b"before\nanother thread\nafter\n"
    assert out.encoding == "utf-8" and out.wrapped is wrapped  # the rest is the stream's


def test_routing_nests_and_each_thread_has_its_own_call() -> None:
    out = ThreadRouted(TextBuffer(), p.STDERR)
    first, second = Sink(), Sink()
    with routed(first, 1):  # type: ignore[arg-type]
        with routed(second, 2):  # type: ignore[arg-type]
            out.write("inner")
        out.write("outer")
    assert first.got == [(1, p.STDERR, b"outer")]
    assert second.got == [(2, p.STDERR, b"inner")]
