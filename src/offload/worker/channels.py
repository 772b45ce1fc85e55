"""Channel ends inside a worker: the senders and receivers a call got in its arguments.

Theory of operation
-------------------
A channel (``offload.channel()``) lives in the process that made it, its *hub*
(:mod:`offload.client.channels`). An end pickled into a call's arguments travels as
``(role, channel id, window)``; unpickled here by :func:`rebuild_end`, it becomes a
:class:`Sender` or :class:`Receiver` bound to the call being unpickled, and talks to the
hub with channel messages on the connection that brought the call, routed by the call's
id like ``Progress`` (worker to hub) and ``Cancel`` (hub to worker).

1. A *door* (the worker's connection, or an inline runner of a server or an actor's
   listener) keeps the ends of the calls it runs in an :class:`Ends`, made on first use:
   ``route(msg)`` hands each channel message it reads to its end, ``send(msgs)`` writes.
2. Credits bound every hop. A sender starts with ``window`` credits (the channel's
   ``maxsize``, or unbounded) and spends one per item; it blocks at zero until the hub
   grants more (``ChannelCredit``) as its items are consumed. A receiver grants the hub
   ``window`` credits when it is unpickled, then more, in batches, as the task consumes.
   No channel item thus ever waits unread on a connection, and a full channel never holds
   up the calls that share it.
3. Items are pickled on the sending thread (its errors are the caller's), then wait in
   the sender's batch; one flusher thread per door writes each batch as one frame, so a
   fast producer's items share frames and system calls. Before the call's Result is sent,
   its senders are flushed (the items come first), then its ends are dropped: the hub
   learns that a call's ends are done from its outcome.
4. Where a worker runs its calls on the thread that reads its socket (``inline`` mode),
   nobody reads while a call runs; an end waiting for credits or items then reads the
   socket itself (``pump``), routing channel messages and leaving the rest (calls,
   cancels, shutdown) to the worker loop, in order.
5. ``async for`` over a receiver takes what has arrived without waiting. An empty end
   registers a waker, which the thread delivering the next frame (the door's reader)
   fires with one ``call_soon_threadsafe``; where nobody reads but the call's own thread
   (``pump``), one executor hand-off per empty wait reads the socket.

The frames: ``ChannelData(kind=ITEMS)`` carries a pickled list of the items' in-band
pickles; ``BLOBS`` a pickled list of blobs (``send_bytes``); ``OBJECT`` one item with
out-of-band buffers (large data).
"""

from __future__ import annotations

import _pickle
import threading
from collections import deque
from time import monotonic as _monotonic

from offload import protocol as p
from offload.errors import ChannelClosed, ChannelTimeout
from offload.serde import dumps, loads
from offload.worker.execution import _current

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import AsyncIterator, Callable, Iterator
    from typing import Any, TypeAlias

    # An item as it waits or travels: (kind, data, out-of-band buffers).
    Entry: TypeAlias = tuple[int, Any, tuple[Any, ...]]

UNBOUNDED = 1 << 62  # the window of a channel with maxsize=0
SEND = "tx"  # the roles an end travels as
RECEIVE = "rx"
_IN_BAND_MAX = 1 << 16  # larger pickles travel alone, with out-of-band buffers
_BATCH_ITEMS = 4096  # items of one frame at most
_BATCH_BYTES = 1 << 20  # bytes of one frame, about, at most
_MAIN_MARK = b"__main__"
_GRANT_MAX = 4096
# An inline worker's end reads the socket for at most this long before it looks again
# (another thread of the task may have read its item meanwhile).
_PUMP_MAX = 0.05
_END = object()  # Receiver._take_locked: the channel ended
_EMPTY = object()  # Receiver._take_locked: nothing yet


def encode_item(obj: Any) -> Entry:
    """``obj`` as a channel item: an in-band pickle (ITEMS) when small, else OBJECT.

    Raises:
        Exception: whatever pickling ``obj`` raises.
    """
    try:
        data = _pickle.dumps(obj, 5)
    except Exception:  # noqa: BLE001 - what the C pickler refuses, serde's cloudpickle tries
        data = b""
    if data and len(data) < _IN_BAND_MAX and _MAIN_MARK not in data:
        return (p.ITEMS, data, ())
    data, buffers = dumps(obj)
    if not buffers and len(data) < _IN_BAND_MAX:
        return (p.ITEMS, data, ())
    return (p.OBJECT, data, tuple(buffers))


def decode_item(entry: Entry) -> Any:
    """The item (a blob: its bytes) of an entry.

    Raises:
        Exception: whatever unpickling it raises.
    """
    kind, data, buffers = entry
    if kind == p.ITEMS:
        return loads(data)
    if kind == p.BLOBS:
        return bytes(data)
    return loads(data, buffers)


def entries_of(msg: p.ChannelData) -> list[Entry]:
    """The items of a ChannelData frame, as entries.

    Raises:
        Exception: the batch cannot be unpickled (a broken peer).
    """
    kind = msg.kind
    if kind == p.OBJECT:
        return [(kind, msg.payload, msg.buffers)]
    return [(kind, data, ()) for data in _pickle.loads(msg.payload)]


def _batch(call_id: int, channel_id: int, kind: int, run: list[Any]) -> p.ChannelData:
    return p.ChannelData(
        call_id=call_id, channel_id=channel_id, kind=kind, payload=_pickle.dumps(run, 5)
    )


def frames_of(call_id: int, channel_id: int, entries: list[Entry]) -> list[p.Message]:
    """Entries as ChannelData frames: runs of small items of one kind share a frame (a
    pickled list of their pickles or blobs)."""
    out: list[p.Message] = []
    run: list[Any] = []
    run_kind = -1
    size = 0
    for kind, data, buffers in entries:
        if kind == p.OBJECT:
            if run:
                out.append(_batch(call_id, channel_id, run_kind, run))
                run = []
                size = 0
            out.append(
                p.ChannelData(
                    call_id=call_id, channel_id=channel_id, kind=kind, payload=data, buffers=buffers
                )
            )
            continue
        if run and (kind != run_kind or len(run) >= _BATCH_ITEMS or size >= _BATCH_BYTES):
            out.append(_batch(call_id, channel_id, run_kind, run))
            run = []
            size = 0
        run_kind = kind
        run.append(data)
        size += len(data)
    if run:
        out.append(_batch(call_id, channel_id, run_kind, run))
    return out


def grant_step(window: int) -> int:
    """After how many consumed items a receiver grants its sender more credits: half the
    window (a batch of grants, while the sender still has the other half to spend), and
    at least every :data:`_GRANT_MAX` items (the grants of an unbounded channel only
    tell the hub what was consumed: it keeps the items in flight until then)."""
    return max(1, min(window // 2, _GRANT_MAX))


class Ends:
    """The channel ends of the calls that one door runs.

    Args:
        send: writes messages to the hub's side, in order; thread-safe.
        pump: in inline mode, ``pump(timeout)`` reads the door's socket once (at most
            ``timeout`` seconds; None: until something arrives) and routes what came;
            None where a reader thread routes everything.
        call_key: the id under which the running call's ends talk (default: the id the
            call arrived with).
    """

    def __init__(
        self,
        send: Callable[[list[p.Message]], object],
        *,
        pump: Callable[[float | None], object] | None = None,
        call_key: Callable[[], int] | None = None,
    ) -> None:
        self.send = send
        self.pump = pump
        self._call_key = call_key
        self._lock = threading.Lock()
        self._ends: dict[tuple[int, int], Sender | Receiver] = {}
        self._by_call: dict[int, list[Sender | Receiver]] = {}
        self._dirty: set[Sender] = set()
        self._wake = threading.Event()
        self._flusher: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<Ends {len(self._ends)} ends of {len(self._by_call)} calls>"

    def current_key(self) -> int:
        """The id the running call's ends talk under."""
        if self._call_key is not None:
            return self._call_key()
        return int(_current.call_id)

    def attach(self, role: str, channel_id: int, window: int) -> Sender | Receiver:
        """The end of channel ``channel_id`` for the call being unpickled (one per call
        and channel: an end passed twice to one call is one end).

        Raises:
            ChannelClosed: the call holds the other end of that channel too.
        """
        call_id = self.current_key()
        key = (call_id, channel_id)
        fresh: Receiver | None = None
        with self._lock:
            end = self._ends.get(key)
            if end is None:
                if role == SEND:
                    end = Sender(self, call_id, channel_id, window)
                else:
                    end = fresh = Receiver(self, call_id, channel_id, window)
                self._ends[key] = end
                self._by_call.setdefault(call_id, []).append(end)
            elif isinstance(end, Sender) != (role == SEND):
                raise ChannelClosed(f"channel {channel_id}: one call cannot hold both of its ends")
        if fresh is not None:  # the hub sends nothing before this first grant
            self.send([p.ChannelCredit(call_id=call_id, channel_id=channel_id, count=window)])
        return end

    def route(self, msg: p.Message) -> None:
        """Hand one channel message from the hub to its end (late ones are dropped)."""
        key = (msg.call_id, msg.channel_id)  # type: ignore[attr-defined]
        end = self._ends.get(key)
        if end is None:
            return  # its call ended: nothing waits for it any more
        if type(msg) is p.ChannelData and isinstance(end, Receiver):
            end.deliver(entries_of(msg))
        elif type(msg) is p.ChannelClose and isinstance(end, Receiver):
            end.finish(msg.error)
        elif type(msg) is p.ChannelCredit and isinstance(end, Sender):
            end.grant(msg.count)

    def call_ended(self, call_id: int) -> None:
        """The call ``call_id`` returned (its Result is not sent yet): write what its
        senders hold, then drop its ends."""
        with self._lock:
            ends = self._by_call.pop(call_id, None)
            if ends is None:
                return
            for end in ends:
                self._ends.pop((end.call_id, end.channel_id), None)
        for end in ends:
            end.detach()

    def dirty(self, sender: Sender) -> None:
        """``sender`` has a batch to write: wake the flusher."""
        with self._lock:
            if sender in self._dirty:
                return
            self._dirty.add(sender)
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="offload-channel-flusher", daemon=True
                )
                self._flusher.start()
        self._wake.set()

    def _flush_loop(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
            wake.clear()
            with self._lock:
                dirty = list(self._dirty)
                self._dirty.clear()
            for sender in dirty:
                sender.flush()


class Sender:
    """The sending end of a channel, in a call that got it as an argument.

    ``send(obj)`` blocks while the receiving side has no room (``maxsize``), and raises
    :class:`~offload.errors.ChannelClosed` once closed. A context manager: leaving it
    closes the end. The call's end closes it anyway.
    """

    def __init__(self, ends: Ends, call_id: int, channel_id: int, window: int) -> None:
        self._ends = ends
        self.call_id = call_id
        self.channel_id = channel_id
        self._credit = window
        # ``with self._lock`` (C speed), the condition only to wait on it.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()  # one batch on the wire at a time, in order
        self._pending: list[Entry] = []
        self._dirty = False  # the flusher was told about the pending batch
        self._closed = False
        self._sent = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        credit = "unbounded" if self._credit >= UNBOUNDED // 2 else f"{self._credit} credits"
        return (
            f"<Sender channel={self.channel_id} call={self.call_id} {state} | {self._sent} "
            f"sent, {len(self._pending)} batched, {credit}>"
        )

    def send(self, obj: Any, timeout: float | None = None) -> None:
        """Send one picklable object; wait while the receiving side has no room.

        Raises:
            ChannelClosed: this end is closed.
            ChannelTimeout: still no room after ``timeout`` seconds.
            Exception: whatever pickling ``obj`` raises.
        """
        self._put(encode_item(obj), timeout)

    def send_bytes(
        self, data: bytes | bytearray | memoryview, timeout: float | None = None
    ) -> None:
        """Send a blob as it is (no pickling); ``recv_bytes`` (or ``recv``) returns it.

        Raises:
            ChannelClosed: this end is closed.
            ChannelTimeout: still no room after ``timeout`` seconds.
        """
        self._put((p.BLOBS, bytes(data), ()), timeout)

    def _put(self, entry: Entry, timeout: float | None) -> None:
        with self._lock:
            deadline = None
            while True:
                if self._closed:
                    raise ChannelClosed(f"channel {self.channel_id}: this sender is closed")
                if self._credit > 0:
                    break
                remaining = None
                if timeout is not None:
                    if deadline is None:
                        deadline = _monotonic() + timeout
                    remaining = deadline - _monotonic()
                    if remaining <= 0:
                        raise ChannelTimeout(
                            f"channel {self.channel_id}: no room after {timeout:g} s",
                            timeout=timeout,
                        )
                self._wait_for_credit(remaining)
            self._credit -= 1
            self._pending.append(entry)
            self._sent += 1
            tell = not self._dirty
            self._dirty = True
        if tell:
            self._ends.dirty(self)

    def _wait_for_credit(self, timeout: float | None) -> None:
        """Wait (condition held) until the hub grants credits, the end closes, or
        ``timeout`` seconds pass."""
        pump = self._ends.pump
        if pump is None:
            self._cond.wait(timeout)
            return
        self._cond.release()  # inline worker: this thread reads the socket itself
        try:
            self.flush()
            pump(_PUMP_MAX if timeout is None else min(timeout, _PUMP_MAX))
        finally:
            self._cond.acquire()

    def grant(self, count: int) -> None:
        """The hub has room for ``count`` more items."""
        with self._lock:
            self._credit += count
            self._cond.notify_all()

    def flush(self) -> None:
        """Write the batched items now."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, []
                self._dirty = False
            if pending:
                self._ends.send(frames_of(self.call_id, self.channel_id, pending))

    def close(self) -> None:
        """Send what is batched, then tell the hub this sender is done. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self.flush()
        self._ends.send([p.ChannelClose(call_id=self.call_id, channel_id=self.channel_id)])

    def detach(self) -> None:
        """The call ended: send what is batched; the end is closed from now on."""
        with self._lock:
            self._closed = True
            self._cond.notify_all()
        self.flush()

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            "a channel end that a call received cannot travel further; pass the "
            "channel's end from the process that made it"
        )


class Receiver:
    """The receiving end of a channel, in a call that got it as an argument.

    An iterator (and an async iterator) over the items; it ends when every sender is
    closed or its call ended, and raises the error of a sender's call that crashed.
    """

    def __init__(self, ends: Ends, call_id: int, channel_id: int, window: int) -> None:
        self._ends = ends
        self.call_id = call_id
        self.channel_id = channel_id
        self._step = grant_step(window)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0  # threads waiting on _cond
        # Coroutines waiting (``async for``): each is woken once, from the thread that
        # delivers, by one ``call_soon_threadsafe`` for a whole frame of items.
        self._wakers: list[Callable[[], object]] = []
        self._items: deque[Entry] = deque()
        self._consumed = 0  # since the last grant
        self._received = 0
        self._ended = False
        self._error = b""
        self._detached = False

    def __repr__(self) -> str:
        state = "detached" if self._detached else "ended" if self._ended else "open"
        return (
            f"<Receiver channel={self.channel_id} call={self.call_id} {state} | "
            f"{self._received} received, {len(self._items)} waiting>"
        )

    def deliver(self, entries: list[Entry]) -> None:
        """Items from the hub (within the credits granted)."""
        with self._lock:
            self._items.extend(entries)
            if self._waiting:
                self._cond.notify()
            wakers = self._take_wakers()
        if wakers:
            _wake(wakers)

    def finish(self, error: bytes) -> None:
        """Every sender is done; ``error`` (pickled), when set, is raised after the items."""
        with self._lock:
            self._ended = True
            self._error = error
            self._cond.notify_all()
            wakers = self._take_wakers()
        _wake(wakers)

    def detach(self) -> None:
        """The call ended (its Result is not sent yet): this end receives no more. The
        hub learns how many items it consumed since the last grant: those it forwarded
        beyond that go back to its queue for the channel's next receiver."""
        with self._lock:
            self._detached = True
            self._cond.notify_all()
            consumed, self._consumed = self._consumed, 0
            wakers = self._take_wakers()
        _wake(wakers)
        if consumed:
            self._ends.send(
                [p.ChannelCredit(call_id=self.call_id, channel_id=self.channel_id, count=consumed)]
            )

    def _next_entry(self, timeout: float | None) -> Entry | None:
        """The next entry; None at the end of the channel.

        Raises:
            ChannelTimeout: nothing came within ``timeout`` seconds.
            ChannelClosed: the call that held this end ended.
            OffloadError: the channel ended with a sender's call's error.
        """
        deadline = None
        with self._lock:
            while True:
                got = self._take_locked()
                if got is not _EMPTY:
                    break
                if timeout is not None and deadline is None:
                    deadline = _monotonic() + timeout
                remaining = None if deadline is None else deadline - _monotonic()
                if remaining is not None and remaining <= 0:
                    raise ChannelTimeout(
                        f"channel {self.channel_id}: nothing received in {timeout:g} s",
                        timeout=timeout or 0.0,
                    )
                self._wait(remaining)
        return self._taken(got)

    def _take_locked(self) -> Any:
        """(Lock held.) ``(entry, grant)`` (``grant``: credits to send the hub now, 0 for
        none), ``_END`` at the end of the channel, or ``_EMPTY``.

        Raises:
            ChannelClosed: the call that held this end ended.
            OffloadError: the channel ended with a sender's call's error.
        """
        if self._items:
            entry = self._items.popleft()
            self._received += 1
            self._consumed += 1
            grant = 0
            if self._consumed >= self._step:
                grant, self._consumed = self._consumed, 0
            return (entry, grant)
        if self._ended:
            if self._error:
                raise loads(self._error)
            return _END
        if self._detached:
            raise ChannelClosed(f"channel {self.channel_id}: its call ended")
        return _EMPTY

    def _taken(self, got: Any) -> Entry | None:
        """The entry of what :meth:`_take_locked` returned (not ``_EMPTY``), after
        granting the hub what it earned; None at the end."""
        if got is _END:
            return None
        entry, grant = got
        if grant:
            self._ends.send(
                [p.ChannelCredit(call_id=self.call_id, channel_id=self.channel_id, count=grant)]
            )
        return entry  # type: ignore[no-any-return]

    def _take_or_wake(self, waker: Callable[[], object]) -> Any:
        """The next entry, None at the end, or ``_EMPTY`` after registering ``waker``
        to be called once something arrives (``async for``).

        Raises:
            As :meth:`_next_entry`.
        """
        with self._lock:
            got = self._take_locked()
            if got is _EMPTY:
                self._wakers.append(waker)
                return _EMPTY
        return self._taken(got)

    def _take_wakers(self) -> list[Callable[[], object]]:
        """(Lock held.) The coroutines' wakers, to call once the lock is released."""
        wakers = self._wakers
        if wakers:
            self._wakers = []
        return wakers

    def _wait(self, timeout: float | None) -> None:
        pump = self._ends.pump
        if pump is None:
            self._waiting += 1
            try:
                self._cond.wait(timeout)
            finally:
                self._waiting -= 1
            return
        self._cond.release()  # inline worker: this thread reads the socket itself
        try:
            pump(_PUMP_MAX if timeout is None else min(timeout, _PUMP_MAX))
        finally:
            self._cond.acquire()

    def recv(self, timeout: float | None = None) -> Any:
        """The next item.

        Raises:
            ChannelClosed: the channel ended (every sender is done), or this call's
                end was detached.
            ChannelTimeout: nothing came within ``timeout`` seconds.
            OffloadError: a sender's call failed (``WorkerCrashed``, ...), after the
                items it sent.
        """
        entry = self._next_entry(timeout)
        if entry is None:
            raise ChannelClosed(f"channel {self.channel_id} ended: every sender is done")
        return decode_item(entry)

    def recv_bytes(self, timeout: float | None = None) -> bytes:
        """The next blob (sent with ``send_bytes``).

        Raises:
            TypeError: the next item is not a blob (it is consumed).
            ChannelClosed, ChannelTimeout, OffloadError: as :meth:`recv`.
        """
        entry = self._next_entry(timeout)
        if entry is None:
            raise ChannelClosed(f"channel {self.channel_id} ended: every sender is done")
        if entry[0] != p.BLOBS:
            raise TypeError("recv_bytes: the next item was sent with send(), not send_bytes()")
        return bytes(entry[1])

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        entry = self._next_entry(None)
        if entry is None:
            raise StopIteration
        return decode_item(entry)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        # What has arrived is taken without waiting; an empty end registers a waker that
        # the delivering thread (the door's reader) resolves with one
        # call_soon_threadsafe for a whole frame, so no thread is used per wait. Only a
        # worker that reads its socket on the call's own thread (``pump``) needs one to
        # read it while the event loop runs on: one hand-off per empty wait, not per item.
        import asyncio

        loop = asyncio.get_running_loop()
        pump = self._ends.pump is not None
        while True:
            with self._lock:
                got = self._take_locked()
            if got is not _EMPTY:
                entry = self._taken(got)
            elif pump:
                entry = await loop.run_in_executor(None, self._next_entry, None)
            else:
                waiter, wake = loop_waiter(loop)
                entry = self._take_or_wake(wake)
                if entry is _EMPTY:
                    await waiter
                    continue
            if entry is None:
                return
            yield decode_item(entry)

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            "a channel end that a call received cannot travel further; pass the "
            "channel's end from the process that made it"
        )


def loop_waiter(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Future[None], Callable[[], None]]:
    """A future of ``loop`` and a function that any thread may call to resolve it (on
    the loop; once the loop is closed it does nothing: nobody waits any more)."""
    waiter: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(_settle, waiter)
        except RuntimeError:  # that loop is closed
            pass

    return waiter, wake


def _settle(waiter: Any) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _wake(wakers: list[Callable[[], object]]) -> None:
    for wake in wakers:
        wake()


_make_lock = threading.Lock()


def rebuild_end(role: str, channel_id: int, window: int) -> Sender | Receiver:
    """Unpickle a channel end: the end of the call being unpickled on this thread.

    Raises:
        ChannelClosed: not inside the unpickling of a call (an end only travels as an
            argument of a call).
    """
    execution = getattr(_current, "execution", None)
    make = getattr(execution, "make_ends", None)
    if execution is None or make is None:
        raise ChannelClosed("a channel end can only be unpickled as an argument of a call")
    ends = execution.ends
    if ends is None:
        with _make_lock:
            ends = execution.ends
            if ends is None:
                ends = execution.ends = make()
    end: Sender | Receiver = ends.attach(role, channel_id, window)
    return end
