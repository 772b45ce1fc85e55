"""``offload.channel()``: a stream of items between this process and its calls.

Theory of operation
-------------------
``tx, rx = offload.channel(maxsize)`` makes a :class:`Hub` here, in the process that
made the channel: the queue of items, the count of open senders, and where each end
went. Either end may be passed to calls (local workers, remote servers, actors); the
worker side of an end is :mod:`offload.worker.channels`.

1. *Travel.* Pickling an end into a call's arguments (its ``__reduce__``) notes it in a
   thread-local :data:`collector` that :func:`offload.client.call.encode_call` turns on
   for the pickling and reads after it, so a call with no channel pays two attribute
   stores and a read. Once the call has its id, :func:`bind` makes a :class:`Link` per end: the
   call holds that end until its future resolves.
2. *Senders.* The local ``tx`` is an open sender until it is closed or handed to a call;
   each call holding ``tx`` is one until it closes it or ends (several calls: fan-in).
   When no sender is left, iteration ends after the queued items; if a sender's call
   failed with an offload error (``WorkerCrashed``, ``WorkerKilled``, ``TaskTimeout``,
   ...), the iteration raises that error after the items.
3. *Receiver.* The local ``rx`` receives until it is handed to a call; that call then
   receives everything (items queued here are forwarded to it) until it ends, when
   ``rx`` is local again. A channel has one receiver at a time. Forwarded items stay
   referenced here (``Link.inflight``) until the call's grants say it consumed them;
   its last grant comes before its result, and what it was sent and did not consume goes
   back to the front of the queue, for the next receiver. A call whose worker died sent
   no last grant: any of its in-flight items may have been taken, so they are dropped
   and counted (``Hub.lost``): an item is delivered at most once, never twice.
4. *Credits* (``maxsize``; 0 is unbounded). The queue here holds at most ``maxsize``
   items from the local ``tx`` (``send`` blocks; never on offload's I/O thread, which
   only ever moves what credits allow), and each call's sender may have at most
   ``maxsize`` items sent and not yet consumed here; consuming an item grants its sender
   one more, in batches (half a window). A call holding ``rx`` grants the items it has
   room for; this side sends no more. Nothing waits unread on a connection, so a slow
   consumer bounds the producer's memory on both sides and in a server between them,
   and never holds up other calls on the same connection.
5. *Routing.* Channel messages carry the id of the call holding the end, like
   ``Progress`` and ``Cancel``: the engine passes those of its calls here
   (:func:`route`), and :meth:`Link.send` sends through the engine to whichever worker
   runs the call. Items forwarded to a remote receiver are batched on the I/O thread:
   one frame for as many items as credits allow.
6. *Retries.* A call with ``retries`` whose worker died is sent again under the same id,
   holding the same ends: the engine calls :func:`retried` before it sends it, and each
   of its links starts afresh (:meth:`Hub.new_attempt`): a fresh credit window, a
   sender open again (the failed attempt's items stay queued, earning it nothing), a
   receiver's in-flight items dropped as after any crash.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from offload import protocol as p
from offload.errors import (
    ChannelClosed,
    ChannelTimeout,
    ExecutionError,
    RemoteError,
    TaskTimeout,
    WorkerCrashed,
    WorkerKilled,
)
from offload.worker.channels import (
    RECEIVE,
    SEND,
    UNBOUNDED,
    decode_item,
    encode_item,
    entries_of,
    frames_of,
    grant_step,
    loop_waiter,
    rebuild_end,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator
    from concurrent.futures import Future

    from offload.worker.channels import Entry

T = TypeVar("T")
FORWARD_DELAY = 0.001  # seconds: see Hub._schedule_forward
_LOCAL = -1  # an entry's kind: a Python object sent here, for a receiver here
_END = object()  # _take: the channel ended
_EMPTY = object()  # _take: nothing yet
_ids = itertools.count(1)
# The ends that calls hold, by (call id, channel id): a call's senders (their items
# and closes arrive here) and receivers (their credits arrive here).
_senders: dict[tuple[int, int], Link] = {}
_receivers: dict[tuple[int, int], Link] = {}


class Collector(threading.local):
    """Per thread: whether a call's arguments are being pickled (``active``), and the
    ends pickled meanwhile (``found``: (hub, role) pairs, None for none)."""

    active = False
    found: list[tuple[Hub, str]] | None = None


collector = Collector()


def channel(maxsize: int = 0) -> tuple[Sender[Any], Receiver[Any]]:
    """A new channel: ``(tx, rx)``.

    Pass either end to calls (also nested inside other arguments): the worker sends
    to this process, or this process streams to the worker; or ``tx`` to one call and
    ``rx`` to another. ``rx`` is an iterator and an async iterator; iteration ends when
    every sender is closed or its call ended (with the offload error of a sender's call
    that crashed).

    Args:
        maxsize: back-pressure: at most this many items wait here from the local
            ``tx``, and each call's sender has at most this many sent and not yet
            received; 0 for no limit.

    Raises:
        TypeError: ``maxsize`` is not an int.
        ValueError: ``maxsize`` is negative.
    """
    if not isinstance(maxsize, int) or isinstance(maxsize, bool):
        raise TypeError(f"maxsize must be an int (0: unbounded), not {type(maxsize).__name__}")
    if maxsize < 0:
        raise ValueError(f"maxsize must be >= 0, not {maxsize}")
    hub = Hub(int(maxsize))
    return Sender(hub), Receiver(hub)


class Link:
    """One end held by one call: where it sends, its credits, whether it is done."""

    __slots__ = (
        "attached",
        "call_id",
        "closed",
        "consumed",
        "credit",
        "hub",
        "inflight",
        "owner",
        "role",
    )

    def __init__(self, hub: Hub, role: str, call_id: int, owner: Any) -> None:
        self.hub = hub
        self.role = role
        self.call_id = call_id
        self.owner = owner  # the engine running the call (send_channel)
        self.credit = 0  # a receiving call: items it has room for
        self.attached = False  # a receiving call: its end was unpickled (first grant)
        self.consumed = 0  # a sending call: its items consumed since the last grant
        self.closed = False
        # A receiving call: the items forwarded to it that it has not said it consumed
        # (its grants say so); when it ends, they go back to the queue.
        self.inflight: deque[Entry] = deque()

    def __repr__(self) -> str:
        closed = " closed" if self.closed else ""
        return f"<Link {self.role} channel={self.hub.id} call={self.call_id}{closed}>"

    def send(self, msgs: list[p.Message]) -> None:
        """Send messages to the worker running the call (dropped once it is gone)."""
        owner = self.owner
        if owner is not None and msgs:
            owner.send_channel(self.call_id, msgs)

    def call_ended(self, future: Future[Any]) -> None:
        """The call's future resolved (a done callback)."""
        key = (self.call_id, self.hub.id)
        if self.role == SEND:
            if _senders.get(key) is self:
                del _senders[key]
        elif _receivers.get(key) is self:
            del _receivers[key]
        error = None
        died = False
        if not future.cancelled():
            exc = future.exception()
            if isinstance(exc, ExecutionError) and not isinstance(exc, RemoteError):
                error = exc
                # Its worker died or was killed mid-call: the call never said what it
                # consumed last (a call that returned or raised did, before its result).
                died = isinstance(exc, (WorkerCrashed, WorkerKilled, TaskTimeout))
        self.hub.call_ended(self, error, died=died)


class Hub:
    """The state of one channel, in the process that made it (see the module docstring).

    Thread-safe: local senders and receivers call in from their threads, the I/O loop
    delivers the calls' messages.
    """

    def __init__(self, maxsize: int) -> None:
        self.id = next(_ids)
        self.maxsize = maxsize
        self.window = maxsize or UNBOUNDED
        self.step = grant_step(self.window)
        # One lock; ``with self.lock`` (C speed) rather than with a Condition, whose
        # __enter__ is Python. Notifications only when someone waits (the counts).
        self.lock = lock = threading.Lock()
        self.not_empty = threading.Condition(lock)
        self.not_full = threading.Condition(lock)
        self.receiving = 0  # local receivers waiting on not_empty
        self.sending = 0  # local senders waiting on not_full
        self.queue: deque[tuple[Entry, Link | None]] = deque()
        self.local_open = True  # the local tx: neither closed nor handed to a call
        self.handed = False  # the local tx went to a call
        self.open_links = 0  # calls holding a sender that is not done
        self.error: BaseException | None = None
        self.receiver: Link | None = None  # the call holding rx, if any
        self.close_sent = False  # to that call: the channel ended
        self.wakers: list[Callable[[], object]] = []  # async receivers waiting
        self.sent = 0
        self.received = 0
        self.lost = 0  # items in flight to receiving calls that died (at most once)
        self._forwarding = threading.Lock()  # one forwarder at a time: frames stay in order
        self._forward_scheduled = False
        self._forwarded_at = 0.0  # when the last scheduled forward ran (monotonic)

    def __repr__(self) -> str:
        bound = self.maxsize or "unbounded"
        senders = self.open_links + (1 if self.local_open else 0)
        where = f"rx in call {self.receiver.call_id}" if self.receiver else "rx here"
        lost = f", {self.lost} lost" if self.lost else ""
        return (
            f"<Channel {self.id} maxsize={bound} | {len(self.queue)} queued, {senders} "
            f"senders open, {where}{lost}{' | ended' if self.ended else ''}>"
        )

    @property
    def ended(self) -> bool:
        """Every sender is done (items may still be queued)."""
        return not self.local_open and self.open_links == 0

    # -- local ends (user threads) -------------------------------------------------------

    def send(self, entry: Entry, timeout: float | None = None) -> None:
        """Queue an item from the local tx; wait while the queue is full.

        Raises:
            ChannelClosed: the local tx is closed or was handed to a call.
            ChannelTimeout: still full after ``timeout`` seconds.
        """
        with self.lock:
            if not self.local_open:
                raise ChannelClosed(self._why_closed())
            if self.maxsize and len(self.queue) >= self.maxsize:
                self._wait_for_room(timeout)
            self.queue.append((entry, None))
            self.sent += 1
            if self.receiving:
                self.not_empty.notify()
            wakers = self.wakers
            if wakers:
                self.wakers = []
            receiver = self.receiver
            forward = receiver is not None and receiver.credit > 0
        if wakers:
            self._wake(wakers)
        if forward and not self._forward_scheduled:
            self._schedule_forward()

    def _wait_for_room(self, timeout: float | None) -> None:
        """Wait (lock held) until the queue has room.

        Raises:
            ChannelClosed: the local tx was closed meanwhile.
            ChannelTimeout: still full after ``timeout`` seconds.
            RuntimeError: called where offload's answers are dispatched (a callback):
                waiting there would hold up the very items that make room.
        """
        _refuse_to_wait_in_dispatch("tx.send() on a full channel")

        def room() -> Any:
            if not self.local_open:
                raise ChannelClosed(self._why_closed())
            return None if len(self.queue) < self.maxsize else _EMPTY

        self._wait_until(room, SEND, timeout, "still full after")

    def _wait_until(
        self, answer: Callable[[], Any], role: str, timeout: float | None, timed_out: str
    ) -> Any:
        """Wait (lock held) on ``role``'s condition (``not_full`` for local senders,
        ``not_empty`` for local receivers) until ``answer()``, asked after each wake-up,
        returns something other than ``_EMPTY``; return that.

        Raises:
            ChannelTimeout: still ``_EMPTY`` after ``timeout`` seconds (the message:
                ``timed_out`` and the timeout).
            Whatever ``answer`` raises.
        """
        sending = role == SEND
        condition = self.not_full if sending else self.not_empty
        deadline = None if timeout is None else _monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - _monotonic()
            if remaining is not None and remaining <= 0:
                raise ChannelTimeout(
                    f"channel {self.id}: {timed_out} {timeout:g} s", timeout=timeout or 0.0
                )
            # The counts say whether anyone waits: notifications only then.
            if sending:
                self.sending += 1
            else:
                self.receiving += 1
            try:
                condition.wait(remaining)
            finally:
                if sending:
                    self.sending -= 1
                else:
                    self.receiving -= 1
            got = answer()
            if got is not _EMPTY:
                return got

    def _why_closed(self) -> str:
        if self.handed:
            return (
                f"channel {self.id}: this tx was handed to a call, which sends from there "
                "(make another channel to send from here too)"
            )
        return f"channel {self.id}: this tx is closed"

    def close_local(self) -> None:
        """The local tx is done."""
        with self.lock:
            if not self.local_open:
                return
            self.local_open = False
            self.not_empty.notify_all()
            self.not_full.notify_all()
            wakers = self._take_wakers()
        self._wake(wakers)
        self._schedule_forward()

    def take(self, timeout: float | None) -> Entry | None:
        """The next entry for the local rx; None at the end.

        Raises:
            ChannelClosed: rx is held by a call.
            ChannelTimeout: nothing within ``timeout`` seconds.
            ExecutionError: a sender's call failed, after its items.
        """
        with self.lock:
            got = self._take_locked()
            if got is _EMPTY:
                got = self._wait_for_items(timeout)
        return self._taken(got)

    def _wait_for_items(self, timeout: float | None) -> Any:
        """:meth:`_take_locked`, waiting (lock held) until it has an answer.

        Raises:
            ChannelTimeout: nothing within ``timeout`` seconds.
            RuntimeError: called where offload's answers are dispatched (a callback).
            As :meth:`_take_locked`.
        """
        _refuse_to_wait_in_dispatch("rx.recv() on an empty channel")
        return self._wait_until(self._take_locked, RECEIVE, timeout, "nothing received in")

    def take_or_wake(self, waker: Callable[[], object]) -> Any:
        """The next entry, None at the end, or _EMPTY after registering ``waker`` to be
        called once something changes (async receivers).

        Raises:
            As :meth:`take`.
        """
        with self.lock:
            got = self._take_locked()
            if got is _EMPTY:
                self.wakers.append(waker)
                return _EMPTY
        return self._taken(got)

    def _take_locked(self) -> Any:
        """Lock held: (entry, grant) or _END or _EMPTY."""
        if self.receiver is not None:
            raise ChannelClosed(
                f"channel {self.id}: rx is held by call {self.receiver.call_id} until it ends"
            )
        if self.queue:
            entry, link = self.queue.popleft()
            self.received += 1
            if self.sending:
                self.not_full.notify()
            return (entry, self._consumed(link))
        if self.ended:
            if self.error is not None:
                raise self.error
            return _END
        return _EMPTY

    def _taken(self, got: Any) -> Entry | None:
        if got is _END:
            return None
        entry, grant = got
        if grant is not None:
            grant[0].send([grant[1]])
        return entry  # type: ignore[no-any-return]

    def _consumed(self, link: Link | None) -> tuple[Link, p.Message] | None:
        """An item of ``link`` left the queue (lock held): the grant to send, if due."""
        if link is None or link.closed:
            return None
        link.consumed += 1
        if link.consumed < self.step:
            return None
        count, link.consumed = link.consumed, 0
        return (link, p.ChannelCredit(call_id=link.call_id, channel_id=self.id, count=count))

    def _take_wakers(self) -> list[Callable[[], object]]:
        wakers = self.wakers
        if wakers:
            self.wakers = []
        return wakers

    @staticmethod
    def _wake(wakers: list[Callable[[], object]]) -> None:
        for wake in wakers:
            wake()

    # -- ends travelling -----------------------------------------------------------------

    def check_travel(self, role: str) -> None:
        """``role``'s end is being pickled into a call's arguments.

        Raises:
            ChannelClosed: the local tx is closed, or rx is held by another call.
        """
        with self.lock:
            if role == SEND and not self.local_open and not self.handed:
                raise ChannelClosed(f"channel {self.id}: this tx is closed")
            if role == RECEIVE and self.receiver is not None:
                raise ChannelClosed(
                    f"channel {self.id}: rx is held by call {self.receiver.call_id}; a "
                    "channel has one receiver at a time"
                )

    def bind(self, link: Link) -> None:
        """``link``'s call holds an end of this channel from now on."""
        with self.lock:
            if link.role == SEND:
                self.open_links += 1
                if self.local_open:
                    self.local_open = False
                    self.handed = True
                    self.not_full.notify_all()
            else:
                self.receiver = link
                self.close_sent = False
                self.not_empty.notify_all()  # a local receiver waiting: it is held now
                wakers = self._take_wakers()
        if link.role == RECEIVE:
            self._wake(wakers)

    def call_ended(self, link: Link, error: BaseException | None, *, died: bool = False) -> None:
        """The call of ``link`` ended (``error``: the offload error it failed with;
        ``died``: its worker died or was killed while it ran)."""
        lost = 0
        with self.lock:
            if link.role == SEND:
                if link.closed:
                    return
                link.closed = True
                self.open_links -= 1
                if error is not None and self.error is None:
                    self.error = error
            else:
                link.closed = True
                if self.receiver is link:
                    self.receiver = None  # rx is local again
                lost = self._settle_inflight(link, died)
            self.not_empty.notify_all()
            wakers = self._take_wakers()
        self._wake(wakers)
        if lost:
            _warn_lost(self.id, link.call_id, lost)
        self._schedule_forward()

    def _settle_inflight(self, link: Link, died: bool) -> int:
        """(Lock held.) The items forwarded to ``link``'s call that it did not say it
        consumed: after a clean end (the call returned or raised, and its last grant
        counted exactly what it took) they go back to the front of the queue, for the
        next receiver; after its worker died they are dropped and counted, since any of
        them may have been taken just before (at most once: never a duplicate). The
        number dropped."""
        inflight, link.inflight = link.inflight, deque()
        if died:
            self.lost += len(inflight)
            return len(inflight)
        self.queue.extendleft([(entry, None) for entry in reversed(inflight)])
        return 0

    def new_attempt(self, link: Link) -> None:
        """``link``'s call failed on a worker and is about to be sent again (its
        ``retries``): the next attempt starts with a fresh credit window.

        A sender: the items the failed attempt sent stay queued, in order, but no longer
        earn credits (the new attempt's window counts its own items only); a sender it
        closed is open again. A receiver: what was in flight to the failed attempt is
        dropped as after any crash (:meth:`_settle_inflight`); nothing more is forwarded
        until the new attempt grants its window, and the end of the channel is told to
        it again.
        """
        lost = 0
        with self._forwarding, self.lock:  # not in the middle of a forward to the old one
            if link.role == SEND:
                link.consumed = 0
                if any(source is link for _, source in self.queue):
                    self.queue = deque(
                        (entry, None if source is link else source) for entry, source in self.queue
                    )
                if link.closed:
                    link.closed = False
                    self.open_links += 1
            else:
                lost = self._settle_inflight(link, died=True)
                link.credit = 0
                link.attached = False
                self.close_sent = False
        if lost:
            _warn_lost(self.id, link.call_id, lost)

    # -- messages from the calls (the I/O loop, or a thread reading its own answer) ------

    def on_data(self, link: Link, msg: p.ChannelData) -> None:
        """Items from a call's sender."""
        entries = entries_of(msg)
        with self.lock:
            self.queue.extend([(entry, link) for entry in entries])
            self.sent += len(entries)
            if self.receiving:
                self.not_empty.notify()
            wakers = self._take_wakers()
            forward = self.receiver is not None and self.receiver.credit > 0
        self._wake(wakers)
        if forward:
            self.forward()

    def on_sender_close(self, link: Link) -> None:
        """A call closed its sender."""
        self.call_ended(link, None)

    def on_credit(self, link: Link, count: int) -> None:
        """The call holding rx has room for ``count`` more items."""
        with self.lock:
            link.credit = min(link.credit + count, UNBOUNDED)
            if link.attached:  # a grant after the first: it consumed ``count`` items
                inflight = link.inflight
                for _ in range(min(count, len(inflight))):
                    inflight.popleft()
            link.attached = True
        self.forward()

    # -- forwarding to a call holding rx -------------------------------------------------

    def _schedule_forward(self) -> None:
        """Forward on the I/O loop, soon: the items sent meanwhile share its frames.

        At once after a quiet spell (a lone item is not held back); within
        :data:`FORWARD_DELAY` of the last forward during a flood, so that a batch is
        many items and the loop is woken once per batch, not per handful."""
        if self.receiver is None or self._forward_scheduled:
            return
        self._forward_scheduled = True
        from offload.transport.loop import get_loop

        loop = get_loop()
        if _monotonic() - self._forwarded_at < FORWARD_DELAY:
            loop.call_later(FORWARD_DELAY, self._forward_soon)
        else:
            loop.call_soon(self._forward_soon)

    def _forward_soon(self) -> None:
        self._forward_scheduled = False
        self._forwarded_at = _monotonic()
        self.forward()

    def forward(self) -> None:
        """Send the call holding rx as many queued items as it has room for, and the
        end of the channel once every sender is done and the queue is empty."""
        with self._forwarding:
            grants: list[tuple[Link, p.Message]] = []
            with self.lock:
                link = self.receiver
                if link is None or not link.attached:
                    return
                n = min(link.credit, len(self.queue))
                taken = [self.queue.popleft() for _ in range(n)]
                link.credit -= n
                self.received += n
                for _, source in taken:
                    grant = self._consumed(source)
                    if grant is not None:
                        grants.append(grant)
                if n:
                    self.not_full.notify(n)
                end = self.ended and not self.queue and not self.close_sent
                if end:
                    self.close_sent = True
                error = self.error
            encoded = [_encoded(entry) for entry, _ in taken]
            entries = [e for e in encoded if e is not None]
            with self.lock:
                if link.closed:  # its call ended meanwhile: the items stay here
                    self.queue.extendleft([(entry, None) for entry in reversed(entries)])
                    return
                link.inflight.extend(entries)
            msgs = frames_of(link.call_id, self.id, entries)
            if end:
                error_bytes = b""
                if error is not None:
                    from offload.serde import dumps

                    error_bytes = dumps(error)[0]
                msgs.append(
                    p.ChannelClose(call_id=link.call_id, channel_id=self.id, error=error_bytes)
                )
            link.send(msgs)
            for source, credit in grants:
                source.send([credit])


def _warn_lost(channel_id: int, call_id: int, count: int) -> None:
    import logging

    logging.getLogger("offload").warning(
        "offload: channel %d: the worker of call %d, which held rx, died; the %d items "
        "it had been sent and had not acknowledged were dropped (a channel delivers at "
        "most once)",
        channel_id,
        call_id,
        count,
    )


def _refuse_to_wait_in_dispatch(what: str) -> None:
    """Raise RuntimeError on offload's I/O thread, or where a thread dispatches answers
    it read itself (a future's callback): waiting there would wait for itself."""
    from offload.transport.channel import in_dispatch

    if in_dispatch():
        raise RuntimeError(
            f"{what} would wait in a callback of offload's I/O thread, which delivers "
            "the channel's items: hand the channel to a thread of your own"
        )


def _encoded(entry: Entry) -> Entry | None:
    """An entry ready to travel (a local object is pickled now; None if it cannot be)."""
    if entry[0] != _LOCAL:
        return entry
    try:
        return encode_item(entry[1])
    except Exception:  # noqa: BLE001 - the item is lost, and said so
        import logging

        logging.getLogger("offload").warning(
            "offload: a channel item of type %s could not be pickled for the call "
            "holding rx, and was dropped",
            type(entry[1]).__name__,
        )
        return None


class _End:
    """What both local ends share: the hub, and travelling into calls."""

    _role = ""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def __reduce__(self) -> tuple[Any, ...]:
        """Travel as an argument of a call: noted for :func:`bind`.

        Raises:
            TypeError: pickled outside a call's arguments.
            ChannelClosed: see :meth:`Hub.check_travel`.
        """
        if not collector.active:
            raise TypeError(
                "a channel end can only travel as an argument of a call (submit, map, an "
                "actor's method)"
            )
        hub = self._hub
        hub.check_travel(self._role)
        found = collector.found
        if found is None:
            found = collector.found = []
        found.append((hub, self._role))
        return (rebuild_end, (self._role, hub.id, hub.window))


class Sender(_End, Generic[T]):
    """The sending end of a channel, here in the process that made it.

    ``send`` blocks while ``maxsize`` items wait. Close it (or use ``with tx:``) when
    done, or hand it to calls: iteration on ``rx`` ends when every sender is done.
    """

    _role = SEND

    def __repr__(self) -> str:
        hub = self._hub
        state = "handed to a call" if hub.handed else "open" if hub.local_open else "closed"
        return f"<offload.Sender channel={hub.id} {state} | {hub!r}>"

    def send(self, obj: T, timeout: float | None = None) -> None:
        """Send one object (it is not copied when ``rx`` is in this process too).

        Raises:
            ChannelClosed: this tx is closed or was handed to a call.
            ChannelTimeout: the channel stayed full for ``timeout`` seconds.
            Exception: whatever pickling ``obj`` raises, when a call holds ``rx``.
        """
        hub = self._hub
        entry: Entry = encode_item(obj) if hub.receiver is not None else (_LOCAL, obj, ())
        hub.send(entry, timeout)

    def send_bytes(
        self, data: bytes | bytearray | memoryview, timeout: float | None = None
    ) -> None:
        """Send a blob as it is (no pickling); ``recv_bytes`` returns it.

        Raises:
            ChannelClosed, ChannelTimeout: as :meth:`send`.
        """
        self._hub.send((p.BLOBS, bytes(data), ()), timeout)

    def close(self) -> None:
        """This sender is done (idempotent; a tx handed to a call is done here)."""
        self._hub.close_local()

    def __enter__(self) -> Sender[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Receiver(_End, Generic[T]):
    """The receiving end of a channel, here in the process that made it.

    An iterator and an async iterator over the items: iteration ends when every sender
    is done, and raises the offload error (``WorkerCrashed``, ...) of a sender's call
    that failed, after the items it sent.
    """

    _role = RECEIVE

    def __repr__(self) -> str:
        return f"<offload.Receiver channel={self._hub.id} | {self._hub!r}>"

    def recv(self, timeout: float | None = None) -> T:
        """The next item.

        Raises:
            ChannelClosed: every sender is done and nothing is left, or rx is held by a
                call.
            ChannelTimeout: nothing came within ``timeout`` seconds (also a
                ``TimeoutError``).
            ExecutionError: a sender's call failed (``WorkerCrashed``, ...), after the
                items it sent.
        """
        entry = self._hub.take(timeout)
        if entry is None:
            raise ChannelClosed(f"channel {self._hub.id} ended: every sender is done")
        return _decoded(entry)  # type: ignore[no-any-return]

    def recv_bytes(self, timeout: float | None = None) -> bytes:
        """The next blob (sent with ``send_bytes``).

        Raises:
            TypeError: the next item was sent with ``send`` (it is consumed).
            ChannelClosed, ChannelTimeout, ExecutionError: as :meth:`recv`.
        """
        entry = self._hub.take(timeout)
        if entry is None:
            raise ChannelClosed(f"channel {self._hub.id} ended: every sender is done")
        if entry[0] != p.BLOBS:
            raise TypeError("recv_bytes: the next item was sent with send(), not send_bytes()")
        return bytes(entry[1])

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        entry = self._hub.take(None)
        if entry is None:
            raise StopIteration
        return _decoded(entry)  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[T]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[T]:
        # No thread per item: an empty channel registers a waker that resolves an
        # asyncio future from whichever thread delivers the next item.
        import asyncio

        loop = asyncio.get_running_loop()
        hub = self._hub
        while True:
            waiter, wake = loop_waiter(loop)
            got = hub.take_or_wake(wake)
            if got is _EMPTY:
                await waiter
                continue
            if got is None:
                return
            yield _decoded(got)


def _decoded(entry: Entry) -> Any:
    if entry[0] == _LOCAL:
        return entry[1]
    return decode_item(entry)


# -- the call side: collecting the ends a call's arguments carry -----------------------


def bind(found: list[tuple[Hub, str]], call_id: int, future: Any) -> None:
    """The call ``call_id`` (its future ``future``) holds these ends until it resolves."""
    owner = getattr(future, "_owner", None)
    seen: set[tuple[int, str]] = set()
    for hub, role in found:
        if (hub.id, role) in seen:
            continue  # one end passed twice, or pickled twice (cloudpickle's retry)
        seen.add((hub.id, role))
        link = Link(hub, role, call_id, owner)
        (_senders if role == SEND else _receivers)[(call_id, hub.id)] = link
        hub.bind(link)
        future.add_done_callback(link.call_ended)


def retried(call_id: int) -> None:
    """The call ``call_id`` failed on a worker and is sent again (its ``retries``): each
    end it holds starts afresh (:meth:`Hub.new_attempt`)."""
    for table in (_senders, _receivers):
        for (held_by, _), link in list(table.items()):
            if held_by == call_id:
                link.hub.new_attempt(link)


def route(msg: p.Message) -> None:
    """A channel message from a call (the engine passes those of its own calls)."""
    kind = type(msg)
    if kind is p.ChannelCredit:
        link = _receivers.get((msg.call_id, msg.channel_id))  # type: ignore[attr-defined]
        if link is not None:
            link.hub.on_credit(link, msg.count)  # type: ignore[attr-defined]
        return
    link = _senders.get((msg.call_id, msg.channel_id))  # type: ignore[attr-defined]
    if link is None:
        return  # its call ended already
    if kind is p.ChannelData:
        link.hub.on_data(link, msg)  # type: ignore[arg-type]
    elif kind is p.ChannelClose:
        link.hub.on_sender_close(link)
