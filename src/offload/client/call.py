"""A call made ready to travel: :func:`encode_call` pickles a callable and its
arguments into a :class:`~offload.client.slot.CallRecord` (or fails the future at once,
with a SerializationError naming what could not be pickled, when they cannot travel).

A module-level function travels by reference, in its own field (pickled once here,
looked up once by the worker); a lambda, a closure or a function of ``__main__`` travels
by value in that same field, pickled again only when what it captures changed (see
:mod:`offload.client.by_value`); anything else (a callable object, a partial) travels by
value with its arguments. A task name travels as the target.
"""

from __future__ import annotations

import sys
import threading

from offload import protocol as p
from offload.client import outcome
from offload.client.by_value import function_by_value
from offload.client.future import Future
from offload.client.scheduler import Scheduler
from offload.client.slot import CallRecord
from offload.serde import culprit, dumps, function_reference, type_name
from offload.transport.channel import in_dispatch

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any

# Pickled arguments of the calls waiting in the parent's queue, in bytes, beyond which
# submit() waits for calls to go out to workers: a flood of submissions of large
# arguments must not hold them all in memory at once (a single call always gets in).
MAX_QUEUED_BYTES = 64 << 20


class _NoChannels:
    """The collector of channel ends while offload.client.channels is not imported:
    none can be found."""

    active = False
    found = None


_NO_CHANNELS = _NoChannels()


def encode_call(
    fn: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    call_id: int,
    future: Future[Any],
    timeout: float | None,
    retries: int,
    max_message_size: int,
) -> CallRecord | None:
    """The record of ``fn(*args, **kwargs)``, or None after failing ``future`` with a
    SerializationError (an argument could not be pickled, or they pickle to more than
    ``max_message_size`` bytes). ``queued_bytes`` is what the call weighs."""
    target = ""
    kind = p.BY_VALUE
    function = b""
    # offload.client.channels makes every channel end, so before it is imported no call
    # can hold one: a program without channels does not import it (nor typing with it).
    channels = sys.modules.get("offload.client.channels")
    collector = _NO_CHANNELS if channels is None else channels.collector
    collector.active = True  # channel ends among the arguments note themselves
    try:
        if isinstance(fn, str):
            kind = p.BY_NAME
            target = fn
            data, buffers = dumps((args, kwargs))
        else:
            target = getattr(fn, "__qualname__", "") + "(...)"
            # By reference if importable, else by value, remembered while what it
            # captures is unchanged (see offload.client.by_value); b"" if neither.
            function = function_reference(fn) or function_by_value(fn)
            if function:
                data, buffers = dumps((args, kwargs))
            else:
                data, buffers = dumps((fn, args, kwargs))
    except BaseException as exc:  # noqa: BLE001 - SystemExit from __reduce__ included
        collector.active = False
        collector.found = None  # the call never goes: its ends stay where they were
        err = outcome.unpicklable_argument(
            outcome.describe_call(fn, args, kwargs), culprit((fn, args, kwargs)), exc
        )
        future._resolve_exception(err, task_raised=False)
        return None
    collector.active = False
    ends = collector.found
    if ends is not None:  # the call holds them until its future resolves
        collector.found = None
        from offload.client.channels import bind  # loaded: it made the ends

        bind(ends, call_id, future)
    size = len(data) + len(function)
    if buffers:
        size += sum(b.nbytes for b in buffers)
    if size > max_message_size:
        err = outcome.too_large(
            outcome.describe_call(fn, args, kwargs),
            size,
            max_message_size,
            type_name(args[0]) if args else None,
        )
        future._resolve_exception(err, task_raised=False)
        return None
    return CallRecord(
        call_id=call_id,
        timeout=timeout,
        retries=retries,
        future=future,
        kind=kind,
        target=target,
        function=function,
        payload=data,
        buffers=tuple(buffers) if buffers else (),
        fn=fn,
        args=args,
        kwargs=kwargs,
        queued_bytes=size,
    )


class QueueBudget:
    """The bytes of pickled arguments that calls waiting in the parent's queue hold
    (:data:`MAX_QUEUED_BYTES` at most). Guarded by the engine's lock: every method is
    called with it held."""

    def __init__(self, lock: threading.Lock) -> None:
        self.used = 0
        self.waiters = 0  # submitters waiting for room
        self._room = threading.Condition(lock)

    def __repr__(self) -> str:
        return f"<QueueBudget used={self.used} limit={MAX_QUEUED_BYTES} waiters={self.waiters}>"

    def wait_for_room(self, size: int, scheduler: Scheduler) -> None:
        """Wait until a call of ``size`` bytes fits (or ``scheduler`` closed). Never where
        waiting could block the delivery of the results that make room (on the I/O
        thread, in a callback): there the call goes over the limit."""
        while (
            self.used
            and self.used + size > MAX_QUEUED_BYTES
            and not scheduler.closed
            and not in_dispatch()
        ):
            self.waiters += 1
            try:
                self._room.wait()
            finally:
                self.waiters -= 1

    def take(self, record: CallRecord) -> None:
        """``record`` joins the queue."""
        self.used += record.queued_bytes

    def release(self, record: CallRecord) -> None:
        """``record`` left the parent's queue (sent, resolved or cancelled)."""
        if record.queued_bytes:
            self.used -= record.queued_bytes
            record.queued_bytes = 0
            if self.waiters:
                self._room.notify_all()

    def wake_all(self) -> None:
        """Let every waiter look again (the engine shut down)."""
        if self.waiters:
            self._room.notify_all()
