"""``offload.Pool``: a ``concurrent.futures.Executor`` that never becomes "broken".

A crashed, killed, timed-out or recycled worker fails only the calls it was running and
is replaced; calls queue in the parent, at most ``workers x concurrency`` run at once.
``map`` and ``imap_unordered`` pull their input lazily (bounded memory over huge or
infinite iterables) and batch items automatically: the chunk size grows while chunks
finish quickly, so tiny items are not dominated by round trips and long ones still
spread over every worker.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import signal as signals
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence

from offload.client.engine import Engine
from offload.client.future import Future
from offload.client.options import check_pool_args, make_options, next_worker_name
from offload.client.slot import WorkerSlot
from offload.client.worker import Submitter, call_settings, remote_target, slot_factory
from offload.errors import RemoteError, RemoteTraceback
from offload.process.child import signal_if_ours

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any, ParamSpec, TypeVar

    from offload.client.status import PoolStats
    from offload.transport.net import TLS
    from offload.transport.ssh import SSH

    P = ParamSpec("P")
    T = TypeVar("T")
    V = TypeVar("V")

log = logging.getLogger("offload")

_pool_ids = itertools.count(1)
# A chunk should take about this long: long enough that its round trip is noise, short
# enough that the last chunks still spread over every worker.
_CHUNK_TARGET = 0.01
_MAX_CHUNK = 16384
# Chunk sizes learned per function (by its qualified name), at most this many.
_MAX_LEARNED = 256
# At most this many items are read ahead of the results (bounded memory on huge inputs).
_MAX_INFLIGHT_ITEMS = 4 * _MAX_CHUNK
# How long kill(SIGKILL) waits to see its workers' exits.
_KILL_WAIT = 5.0


class Pool(Submitter, concurrent.futures.Executor):
    """A pool of worker processes.

    Args:
        workers: number of local worker processes (default: the CPU count, or none when
            ``hosts`` are given).
        hosts: worker servers: addresses of running ones (``offload serve``), and
            :class:`offload.SSH` records of machines where the pool starts one over ssh
            (torn down with the pool). Each contributes as many slots as it announces.
            A lost host's calls fail with :class:`~offload.ConnectionLost` (or are
            retried elsewhere, per ``retries``); the pool reconnects when the host
            returns (over ssh: it starts the server again).
        token: the servers' token (default: ``OFFLOAD_TOKEN`` / ``OFFLOAD_TOKEN_FILE``);
            not needed for SSH hosts, whose token is made for each start.
        tls: TLS settings for the servers given by address.
        workers_per_host: worker processes of each server started over ssh (default:
            that machine's CPU count).
        **options: worker options, as for :func:`offload.spawn` (``name`` names the pool;
            its workers are ``name-1``, ``name-2``, ...).

    A pool dropped without :meth:`shutdown` lets the calls already submitted finish,
    then its workers exit.

    Raises:
        TypeError: an option of the wrong type, e.g. ``Pool("2")`` or ``name=123``.
        ValueError: an option with a bad value, e.g. ``workers=-1`` or
            ``concurrency=0``; every option is checked here, before any process starts.
        AuthenticationError: hosts given but no token, or a token shorter than 32 bytes.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        hosts: Iterable[str | SSH] | None = None,
        token: bytes | str | None = None,
        tls: TLS | None = None,
        workers_per_host: int | None = None,
        **options: Any,
    ) -> None:
        workers, host_list = check_pool_args(
            workers, hosts, token, tls, options.get("where"), workers_per_host=workers_per_host
        )
        opts = make_options(**options)
        targets = [remote_target(opts, h, token, tls, workers=workers_per_host) for h in host_list]
        self.name = opts.name or f"offload-pool-{next(_pool_ids)}"
        self._workers = workers + len(host_list)
        names = [
            f"{self.name}-{i + 1}" if opts.name else next_worker_name() for i in range(workers)
        ] + [str(t.address) for t in targets]
        self._engine = Engine(
            opts,
            self._workers,
            keep_warm=True,
            max_start_failures=3,
            label=self.name,
            names=names,
            slot_factory=slot_factory({workers + i: t for i, t in enumerate(targets)}),
            independent=range(workers, workers + len(targets)),
        )
        # The chunk size each automatic map ended with, by function (its qualified name,
        # which keeps nothing alive): the next map of that function starts there instead
        # of growing again from small chunks.
        self._chunk_sizes: dict[str, int] = {}
        self._engine.start()
        # Dropped without shutdown(): the calls already submitted still run (their
        # futures may be held), then the workers exit.
        self._finalizer = weakref.finalize(self, self._engine.shutdown_dropped, False)

    # -- submitting (submit() comes from Submitter) ---------------------------------

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        """``map(fn, *iterables)`` on the pool; results in input order.

        The input is read lazily, a bounded number of chunks ahead of the results, so a
        huge or endless iterable needs bounded memory.

        Args:
            timeout: seconds from this call; a result not ready by then raises
                ``TimeoutError`` (the calls go on).
            chunksize: items per call; None sizes chunks automatically: they start
                small and grow while they finish quickly, and a later map of the same
                module-level function starts at the size the last one reached.
            progress: show a tqdm progress bar on a terminal.

        Raises:
            Exception: the first failed item's exception (the task's own, or an
                :class:`~offload.ExecutionError`), when iteration reaches it; the map
                ends there.
            TimeoutError: ``timeout`` passed before the next result was ready.
        """
        items: Iterator[Any] | list[Any] | tuple[Any, ...]
        if len(iterables) == 1:  # items travel bare, not as 1-tuples
            items = _items(iterables[0])
            star = False
        else:
            items, star = zip(*iterables, strict=False), True
        return self._map(
            fn,
            items,
            timeout,
            chunksize,
            progress,
            ordered=True,
            total=_length(iterables),
            star=star,
        )

    def imap_unordered(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Any],
        *,
        chunksize: int | None = None,
        progress: bool = False,
    ) -> Iterator[T]:
        """Like :meth:`map` with one iterable, but yield results as they finish."""
        return self._map(
            fn,
            _items(iterable),
            None,
            chunksize,
            progress,
            ordered=False,
            total=_length((iterable,)),
            star=False,
        )

    def map_reduce(
        self,
        map_fn: Callable[[T], V],
        reduce_fn: Callable[[V, V], V],
        iterable: Iterable[T],
        initial: V,
        *,
        chunksize: int | None = None,
        timeout: float | None = None,
    ) -> V:
        """``reduce(reduce_fn, map(map_fn, iterable), initial)``, folded in the workers.

        Each call folds a contiguous chunk of the input into one partial result,
        ``reduce_fn(...reduce_fn(map_fn(x1), map_fn(x2))..., map_fn(xn))``, so only the
        partial crosses back; this process then folds ``initial`` with the partials,
        in input order: ``reduce_fn(...reduce_fn(initial, p1)..., pk)``. So
        ``reduce_fn`` must be associative (``(a + b) + c == a + (b + c)``);
        commutativity is not needed. ``initial`` is used exactly once, here: it need not
        be an identity element (``map_reduce(f, add, xs, 10)`` adds 10 once).

        * A sized input (a list, tuple, range, set, ...) is split into one chunk per
          worker slot (``workers x concurrency``, plus each host's slots), of equal
          lengths within one item: one call, and one partial result, per slot.
        * An unsized input (a generator) is read lazily, with bounded memory, in chunks
          sized as :meth:`map` sizes them (or ``chunksize`` items): then one partial per
          chunk crosses back.

        Args:
            map_fn: applied to each item in a worker (a lambda or a ``__main__``
                function travels by value); an :func:`offload.task` keeps its
                ``timeout`` (per item, so a chunk's call gets ``timeout x`` its length)
                and ``retries``.
            reduce_fn: combines two mapped values (and partial results) into one.
            iterable: the items.
            initial: the start of the fold in this process; the result of an empty
                input.
            chunksize: items per call, instead of the sizes above.
            timeout: seconds from this call; not done by then raises ``TimeoutError``
                (the calls not started yet are cancelled, running ones go on).

        Returns:
            The folded value.

        Raises:
            Exception: what ``map_fn`` or ``reduce_fn`` raised (as itself, with the
                worker-side traceback as ``__cause__``), or the
                :class:`~offload.ExecutionError` a call failed with (its worker
                crashed, ...); the calls not started yet are cancelled.
            TimeoutError: ``timeout`` passed.
            TypeError: ``map_fn`` or ``reduce_fn`` is not callable (a task name
                cannot be folded).
            ValueError: ``chunksize`` < 1.
            RuntimeError: after shutdown, or in a process forked from the one that made
                the pool.
        """
        if not callable(map_fn) or not callable(reduce_fn):
            raise TypeError("map_reduce() needs callables for map_fn and reduce_fn")
        self._engine.check_owner()
        # A list, tuple or range is sliced into chunks (a range's slices are ranges).
        items: Iterator[Any] | Sequence[Any] = (
            iterable if isinstance(iterable, (list, tuple, range)) else iter(iterable)
        )
        total = _length((iterable,))
        plan: Iterator[int] | None = None
        if total is not None and chunksize is None:
            # One chunk per slot, of lengths within one item of each other.
            with self._engine.lock:
                slots = sum(slot.capacity for slot in self._engine.scheduler.slots)
            count = max(1, min(slots, total))
            plan = (total // count + (i < total % count) for i in range(count))
        results = self._map(
            map_fn,
            items,
            timeout,
            chunksize,
            False,
            ordered=True,
            total=total,
            star=False,
            reduce_fn=reduce_fn,
            plan=plan,
        )
        acc = initial
        try:
            for partial in results:
                acc = reduce_fn(acc, partial)
        finally:
            results.close()  # on an error here: the chunks not started never run
        return acc

    def _map(
        self,
        fn: Callable[..., T],
        items: Iterator[Any] | Sequence[Any],
        timeout: float | None,
        chunksize: int | None,
        progress: bool,
        *,
        ordered: bool,
        total: int | None,
        star: bool,
        reduce_fn: Callable[[Any, Any], Any] | None = None,
        plan: Iterator[int] | None = None,
    ) -> MapIterator[T]:
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        if self._engine.scheduler.closed:
            raise RuntimeError("cannot map after shutdown")
        target, call_timeout, retries = call_settings(fn)
        bar = _progress_bar(total) if progress else None
        run = _MapRun(
            self,
            target,
            items,
            timeout=timeout,
            chunksize=chunksize,
            call_timeout=call_timeout,
            retries=retries,
            ordered=ordered,
            bar=bar,
            total=total,
            star=star,
            reduce_fn=reduce_fn,
            plan=plan,
        )
        return MapIterator(run.chunks())

    # -- state -------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """Workers busy/idle/starting, calls queued/running/done/failed, restarts.

        Raises:
            RuntimeError: in a process forked from the one that made the pool.
        """
        engine = self._engine
        engine.check_owner()
        with engine.lock:
            counts = engine.scheduler.counts()
        from offload.client.status import PoolStats  # dataclasses: imported when asked

        return PoolStats(
            workers=self._workers,
            busy=counts.busy,
            idle=counts.idle,
            starting=counts.starting,
            queued=counts.queued,
            running=counts.running,
            done=engine.stats_done,
            failed=engine.stats_failed,
            restarts=engine.restarts,
        )

    def worker_pids(self) -> list[int]:
        """The pids of the live local workers.

        Raises:
            RuntimeError: in a process forked from the one that made the pool.
        """
        self._engine.check_owner()
        with self._engine.lock:
            procs = list(self._engine.current.values())
        return [pid for pid in (proc.local_pid for proc in procs) if pid is not None]

    def kill(self, signal: int = signals.SIGTERM) -> list[int]:
        """Send ``signal`` to every local worker process (Procrastinate's
        ``kill_processes``); return the pids it was sent to.

        A worker that dies of it is replaced, as after any crash: its running calls
        fail with :class:`~offload.WorkerCrashed` naming the signal (``.signal ==
        "SIGTERM"``, ``.reason == "signal"``, and a message saying that pool.kill()
        sent it) or are retried per their ``retries``, and ``on_failure`` fires: to the
        pool it is a death it did not cause (unlike :meth:`shutdown` with ``kill=True``
        or ``Worker.kill()``, whose calls fail with WorkerKilled). A worker that
        survives it (a handler installed by the initializer or a task, for
        ``SIGUSR1`` say) keeps running, with its calls.

        With ``SIGKILL`` (certain death), it returns once the pool has seen those
        workers die, so calls submitted afterwards go to their replacements. With a
        signal a worker may survive, it returns once the signal is sent: a call
        submitted at once may still be sent to a worker that is dying of it (and fail
        with WorkerCrashed, or be retried per its ``retries``).

        Only the worker process itself gets the signal, not the task's subprocesses
        (when the worker dies, those are killed with its process group as usual).
        Workers still starting or already stopping are skipped: a starting worker has
        not run its initializer, which may be what installs the handler. Workers on
        remote hosts (``offload serve``) are not signalled: the protocol has no message
        for it, so only local workers get it.

        Args:
            signal: the signal number (``signal.SIGUSR1``, ...); default SIGTERM.

        Raises:
            ValueError: ``signal`` is not a valid signal number.
            RuntimeError: in a process forked from the one that made the pool.
        """
        sig = signals.Signals(signal)  # ValueError for a number that is no signal
        engine = self._engine
        engine.check_owner()
        with engine.lock:
            procs = [p for p in engine.current.values() if p.ready and not p.expected_exit]
        sent: list[int] = []
        signalled: list[WorkerSlot] = []
        for proc in procs:
            pid = proc.local_pid
            # The pid names this worker while local_pid gives it: a pid is not reused
            # before its process is reaped, and a reaped worker's local_pid is None.
            if pid is None:
                continue
            engine.note_signalled(pid, sig.name)  # before: it may die at once
            if signal_if_ours(pid, sig, _still_pid(proc, pid)):
                sent.append(pid)
                signalled.append(proc)
        # (Not on the I/O loop's thread, e.g. from a done-callback: that thread is the
        # one that reports the exits.)
        if sig == signals.SIGKILL and signalled and not engine.loop.in_loop():
            # Their exits arrive through the I/O loop at once (a pidfd); the bound only
            # covers a process the kernel is slow to end (stuck in uninterruptible I/O).
            with engine.exited:
                seen = engine.exited.wait_for(
                    lambda: all(engine.current.get(p.slot) is not p for p in signalled),
                    _KILL_WAIT,
                )
            if not seen:
                log.warning("offload: %r: a SIGKILLed worker was not seen exiting yet", self)
        return sent

    # -- ending ------------------------------------------------------------------------

    def shutdown(
        self,
        wait: bool = True,
        *,
        cancel_futures: bool = False,
        timeout: float | None = None,
        kill: bool = False,
    ) -> None:
        """Stop accepting calls and stop the workers.

        Args:
            wait: block until every worker has exited.
            cancel_futures: cancel the calls still queued in the parent.
            timeout: with ``wait``, kill the workers after this many seconds; their
                running calls fail with :class:`~offload.WorkerKilled`.
            kill: kill the workers now (running calls fail with WorkerKilled, queued
                calls are cancelled).
        """
        engine = self._engine
        self._finalizer.detach()
        if kill:
            engine.abort(wait=wait)  # every process, also those stopping gracefully
            return
        engine.shutdown(wait=wait, cancel_futures=cancel_futures, timeout=timeout)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            # Ctrl-C, or the program exiting (SystemExit, e.g. from a SIGTERM handler):
            # cancel what is queued, kill what runs, let the exception go on at once.
            self.shutdown(wait=True, kill=True)
        else:
            self.shutdown(wait=True)

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        import asyncio  # only here: importing asyncio costs a fresh program ~30 ms

        kill = exc_type is not None and (
            not issubclass(exc_type, Exception) or issubclass(exc_type, asyncio.CancelledError)
        )
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.shutdown(wait=True, kill=kill)
        )

    def __repr__(self) -> str:
        if not self._engine.owned_here():
            return f"<Pool {self.name} inherited from process {self._engine.owner_pid}: unusable>"
        s = self.stats()
        state = " shutdown" if self._engine.scheduler.closed else ""
        return (
            f"<Pool {self.name} workers={s.workers} busy={s.busy} idle={s.idle} "
            f"starting={s.starting} queued={s.queued}{state}>"
        )


def _still_pid(proc: WorkerSlot, pid: int) -> Callable[[], bool]:
    """Whether ``proc`` still runs as ``pid`` (see :func:`signal_if_ours`)."""
    return lambda: proc.local_pid == pid


def _chunk_key(fn: Any) -> str:
    """The name under which a map remembers ``fn``'s chunk size: ``module.qualname`` of
    a function or builtin defined at a module's top level (also ``__main__``'s); ``""``
    for anything else (lambdas, closures, partials, callable objects, task names)."""
    if not isinstance(fn, (types.FunctionType, types.BuiltinFunctionType)):
        return ""
    qualname = getattr(fn, "__qualname__", "<")
    if "<" in qualname:
        return ""
    return f"{getattr(fn, '__module__', None)}.{qualname}"


def _items(iterable: Iterable[Any]) -> Iterator[Any] | list[Any] | tuple[Any, ...]:
    """What a map reads its items from: a list or tuple itself (its chunks are slices,
    several times cheaper than collecting an iterator's items one by one), else an
    iterator over ``iterable``."""
    if type(iterable) is list or type(iterable) is tuple:
        return iterable
    return iter(iterable)


def _length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    lengths = []
    for it in iterables:
        try:
            lengths.append(len(it))  # type: ignore[arg-type]
        except TypeError:
            return None
    return min(lengths) if lengths else None


def _progress_bar(total: int | None) -> Any:
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise ImportError(
            "progress=True needs tqdm: pip install 'offload[progress]' (or tqdm)"
        ) from exc

    class Bar(tqdm):  # type: ignore[misc,valid-type,unused-ignore]
        monitor_interval = 0  # no tqdm monitor thread left running after the map

    return Bar(total=total, unit="call", file=sys.stderr)


class _MapRun:
    """One map/imap_unordered/map_reduce: feeds chunks into the pool and yields results.

    A map_reduce (``reduce_fn`` given) sends each chunk to :func:`fold_chunk`, which
    answers with a list of one partial result instead of one value per item; ``plan``
    then gives the length of each chunk in turn (one chunk per slot of a sized input).
    """

    def __init__(
        self,
        pool: Pool,
        fn: Any,
        items: Iterator[Any] | Sequence[Any],
        *,
        timeout: float | None,
        chunksize: int | None,
        call_timeout: float | None,
        retries: int,
        ordered: bool,
        bar: Any,
        total: int | None = None,
        star: bool = True,
        reduce_fn: Callable[[Any, Any], Any] | None = None,
        plan: Iterator[int] | None = None,
    ) -> None:
        self.pool = pool
        self.reduce_fn = reduce_fn
        self.plan = plan
        self.star = star  # items are argument tuples (several iterables) or single values
        self.fn = fn
        # A list or tuple (or a map_reduce's range) is read by slicing (at self.pos),
        # anything else through islice.
        self.sequence: Sequence[Any] | None = None
        self.items: Iterator[Any] = iter(())
        if isinstance(items, (list, tuple, range)):
            self.sequence = items
        else:
            self.items = iter(items)
        self.pos = 0
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.fixed = chunksize
        # Automatic chunks start small (a call may be long) unless the input is known to
        # be large, and grow fourfold while they finish quickly. When the length of the
        # input is known, a chunk is at most a sixteenth of each worker's share of it, so
        # that the last chunks end close together (no worker runs a large last chunk
        # while the others wait).
        # A map of a function that an earlier map sized already starts at that size.
        workers = max(1, pool._workers)
        start = max(1, min(64, total // (workers * 64))) if total is not None else 1
        self.max_size = _MAX_CHUNK
        if total is not None:
            self.max_size = max(start, min(_MAX_CHUNK, total // (16 * workers)))
        self.key = _chunk_key(fn) if chunksize is None else ""
        learned = pool._chunk_sizes.get(self.key, 0) if self.key else 0
        self.size = chunksize or max(start, min(self.max_size, learned))
        self.call_timeout = call_timeout
        self.retries = retries
        self.ordered = ordered
        self.bar = bar
        engine = pool._engine
        # Enough chunks in flight to keep every slot and its prefetch busy.
        self.window = max(4, 4 * pool._workers * engine.options.concurrency)
        self.exhausted = False
        self.inflight_items = 0
        self.inflight: deque[tuple[Future[Any], int, float]] = deque()
        self.done_event = threading.Condition()
        self.finished: deque[tuple[Future[Any], int, float]] = deque()

    def _fill(self) -> None:
        # A planned split (a sized map_reduce input: one chunk per slot, so a bounded
        # number) is sent whole: its items are in memory already.
        while not self.exhausted and (
            self.plan is not None
            or (
                len(self.inflight) < self.window
                and (len(self.inflight) < 2 or self.inflight_items < _MAX_INFLIGHT_ITEMS)
            )
        ):
            size = self.size if self.plan is None else next(self.plan, 0)
            if self.sequence is not None:
                chunk: Sequence[Any] = self.sequence[self.pos : self.pos + size]
                self.pos += len(chunk)
            else:
                chunk = list(itertools.islice(self.items, size))
            if not chunk:
                self.exhausted = True
                return
            # Calls carry the task's per-call timeout, scaled by the chunk's length.
            timeout = None if self.call_timeout is None else self.call_timeout * len(chunk)
            # Imported by the first map: a program that only submits never needs it.
            from offload.worker.batch import fold_chunk, run_chunk

            call: Callable[..., Any] = run_chunk
            args: tuple[Any, ...] = (self.fn, chunk, self.star)
            if self.reduce_fn is not None:  # the worker folds the chunk into one partial
                call, args = fold_chunk, (self.fn, self.reduce_fn, chunk)
            fut = self.pool._engine.submit(
                call,
                args,
                {},
                timeout=timeout,
                retries=self.retries,
            )
            entry = (fut, len(chunk), time.monotonic())
            self.inflight_items += len(chunk)
            self.inflight.append(entry)
            if not self.ordered:
                fut.add_done_callback(functools.partial(self._on_done, entry))

    def _on_done(self, entry: tuple[Future[Any], int, float], _: object) -> None:
        with self.done_event:
            self.finished.append(entry)
            self.done_event.notify()

    def _grow(self, started: float, count: int) -> None:
        if self.fixed is not None or self.plan is not None:
            return
        took = time.monotonic() - started
        if took < _CHUNK_TARGET and self.size < self.max_size:
            self.size = min(self.max_size, self.size * 4)
        elif took > 4 * _CHUNK_TARGET and self.size > 1:
            self.size = max(1, self.size // 2)
        else:
            return
        if self.key:
            sizes = self.pool._chunk_sizes
            if len(sizes) >= _MAX_LEARNED and self.key not in sizes:
                sizes.clear()
            sizes[self.key] = self.size

    def _remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def chunks(self) -> Generator[Iterable[Any], None, None]:
        """The results chunk by chunk (a list, or an iterator that raises at the first
        failed item)."""
        try:
            self._fill()
            while self.inflight:
                if self.ordered:
                    fut, count, started = self.inflight.popleft()
                    self.inflight_items -= count
                    outcomes = fut.result(self._remaining())
                else:
                    with self.done_event:
                        while not self.finished:
                            self.done_event.wait()
                        entry = self.finished.popleft()
                    self.inflight.remove(entry)
                    fut, count, started = entry
                    self.inflight_items -= count
                    outcomes = fut.result()
                self._grow(started, count)
                self._fill()
                all_ok, values = outcomes
                if self.bar is not None:
                    self.bar.update(len(values))
                if all_ok:
                    yield values
                else:  # raises at the failed item, and the map ends there
                    yield _until_failure(values)
                    return
        finally:
            # Abandoned (break, exception, Ctrl-C): queued chunks never run.
            for fut, _, _ in self.inflight:
                fut.cancel()
            if self.bar is not None:
                self.bar.close()


class MapIterator(Iterator["T"]):  # "T": a type variable for type checkers only
    """What :meth:`Pool.map` and :meth:`Pool.imap_unordered` return: an iterator over
    the results that also has ``close()`` (stop: the calls not sent yet never run).

    ``for`` loops and ``list()`` run over the results chunk by chunk at C speed: the
    chunks are lists, chained by ``itertools.chain``, which ``iter()`` hands out. It
    is the one underlying iterator, so ``next()`` and loops share their position.
    """

    def __init__(self, chunks: Generator[Iterable[T], None, None]) -> None:
        self._chunks = chunks
        self._items: Iterator[T] = itertools.chain.from_iterable(chunks)

    def __iter__(self) -> Iterator[T]:
        return self._items

    def __next__(self) -> T:
        return next(self._items)

    def close(self) -> None:
        """Stop early: cancel the chunks that were not sent to a worker yet."""
        self._chunks.close()


def _until_failure(outcomes: list[tuple[Any, ...]]) -> Iterator[Any]:
    for outcome in outcomes:
        yield _unpack(outcome)


def _unpack(outcome: tuple[Any, ...]) -> Any:
    if outcome[0]:
        return outcome[1]
    _, exc, type_name, message, tb = outcome
    if exc is None:
        exc = RemoteError(message, type_name=type_name, traceback=tb)
    exc.__cause__ = RemoteTraceback(tb)
    raise exc
