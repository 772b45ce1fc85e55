"""Worker handles: ``offload.spawn()`` and ``offload.delegate()``.

A :class:`Worker` is a stateless slot for one process: when the process dies (crash,
kill, timeout, ``max_tasks``, ``memory_limit``), the calls running there fail with a
typed error, ``on_failure`` fires for unexpected deaths, and the next call starts a fresh
process (``w.pid`` changes).
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Mapping

from offload._lazy import instance_of
from offload.client.engine import Engine
from offload.client.future import Future
from offload.client.local import LocalSlot
from offload.client.options import (
    WorkerOptions,
    check_connect_args,
    check_tls,
    check_token,
    make_options,
)
from offload.client.slot import SlotFactory, SlotHost, WorkerSlot

# Remote servers, ssh, TLS and tasks are imported where first used: a program that only
# runs local workers never imports them (nor ssl, json, hashlib...); typing neither.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ParamSpec, TypeVar, overload

    from offload.client.remote import RemoteTarget
    from offload.client.ssh import SSHTarget
    from offload.tasks import Task
    from offload.transport.net import TLS

    P = ParamSpec("P")
    T = TypeVar("T")


def slot_factory(remotes: Mapping[int, RemoteTarget | SSHTarget]) -> SlotFactory:
    """The slot factory of a pool or handle: a connection to the worker server for the
    slots in ``remotes`` (started over ssh first for an SSHTarget), a local process for
    the others."""

    def make(host: SlotHost, index: int, gen: int, name: str) -> WorkerSlot:
        target = remotes.get(index)
        if target is None:
            if host.options.start_method == "attach":  # a worker started by hand
                from offload.client.attach import AttachSlot

                return AttachSlot(host, index, gen, name)
            return LocalSlot(host, index, gen, name)
        from offload.client.remote import RemoteSlot, RemoteTarget  # made the target

        if isinstance(target, RemoteTarget):
            return RemoteSlot(host, index, gen, name, target)
        from offload.client.ssh import SSHSlot

        return SSHSlot(host, index, gen, name, target)

    return make


def remote_target(
    opts: WorkerOptions,
    where: Any,
    token: bytes | str | None,
    tls: TLS | None,
    *,
    workers: int | None = None,
) -> RemoteTarget | SSHTarget:
    """Where a remote slot goes: a worker server's address (``where`` a str), or one to
    start over ssh (``where`` an :class:`offload.SSH`, with ``workers`` processes there;
    its token is made for each start, so ``token`` and ``tls`` do not apply)."""
    from offload.client.remote import DEFAULT_HEARTBEAT, RemoteTarget

    if instance_of(where, "offload.transport.ssh", "SSH"):
        from offload.client.ssh import SSHTarget

        return SSHTarget(
            where,
            workers=workers,
            heartbeat=opts.heartbeat or DEFAULT_HEARTBEAT,
            preload=tuple(opts.preload),
            env=opts.env,
        )
    return RemoteTarget.parse(where, token, tls, opts.heartbeat)


def call_settings(fn: Any) -> tuple[Any, float | None, int]:
    """(what to send, timeout, retries) for a callable, a Task or a task name.

    A name registered in this process (``@offload.task(name=...)``) carries its task's
    ``timeout`` and ``retries``, as the task object itself would; a name only the
    worker knows runs with none (a worker server applies its own task's timeout)."""
    if instance_of(fn, "offload.tasks", "Task"):
        return fn, fn.timeout, fn.retries
    if isinstance(fn, str):
        # No task can be registered before offload.tasks is imported.
        tasks = sys.modules.get("offload.tasks")
        known = None if tasks is None else tasks.registered_task(fn)
        if known is not None:
            return fn, known.timeout, known.retries
        return fn, None, 0
    if callable(fn):
        return fn, None, 0
    raise TypeError(f"submit() needs a callable or a task name, not {type(fn).__name__}")


class Submitter:
    """``submit()`` for everything that runs calls through an engine (worker handles,
    pools): one typed signature, one place."""

    _engine: Engine

    if TYPE_CHECKING:  # the signatures, for type checkers

        @overload
        def submit(self, fn: Task[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]: ...
        @overload
        def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]: ...
        @overload
        def submit(self, fn: str, /, *args: Any, **kwargs: Any) -> Future[Any]: ...

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a worker.

        Args:
            fn: a picklable callable, a :class:`~offload.Task`, or a registered task name.

        Returns:
            A future that always resolves: with the value, the task's own exception, or
            an :class:`~offload.ExecutionError` saying what went wrong.

        Raises:
            RuntimeError: the worker or pool was shut down.
        """
        target, timeout, retries = call_settings(fn)
        return self._engine.submit(target, args, kwargs, timeout=timeout, retries=retries)


class Worker(Submitter):
    """A handle on one worker process (restarted on demand after it dies).

    Use :func:`offload.spawn` to make one. Thread-safe. Picklable: a handle passed to a
    task elsewhere (or pickled and loaded by another program) connects to this worker's
    process and calls it there (see :meth:`__reduce__`).
    """

    def __init__(
        self,
        options: WorkerOptions,
        *,
        wait: bool = True,
        remote: RemoteTarget | SSHTarget | None = None,
    ) -> None:
        self._options = options
        self._remote = remote
        self._engine = Engine(
            options,
            1,
            keep_warm=True,
            max_start_failures=1,
            label=options.name or "",
            names=[options.name or (str(remote.address) if remote else "")],
            slot_factory=slot_factory({0: remote} if remote is not None else {}),
            independent=(0,) if remote is not None else (),
        )
        # The handle may be dropped without shutdown(): stop the process then.
        self._finalizer = weakref.finalize(self, self._engine.shutdown_dropped, True)
        self._engine.start()
        if wait:
            try:
                self._engine.wait_ready()
            except BaseException:
                self._engine.shutdown(wait=True, cancel_futures=True, timeout=0)
                self._finalizer.detach()
                raise
        self._engine.stop_keeping_warm()  # restart lazily, on the next call

    @property
    def name(self) -> str:
        """The worker's name (in errors, logs and its process title); a remote worker is
        named after its server's address unless given a name."""
        if self._options.name:
            return self._options.name
        return str(self._remote.address) if self._remote is not None else ""

    @property
    def pid(self) -> int | None:
        """The pid of the current process (for a remote worker: the server's), or None
        between processes."""
        proc = self._engine.current.get(0)
        return proc.pid if proc is not None else None

    @property
    def address(self) -> str | None:
        """The worker server's address, for a remote worker; None for a local one."""
        return str(self._remote.address) if self._remote is not None else None

    @property
    def alive(self) -> bool:
        """Whether the worker's process (or connection) is up."""
        proc = self._engine.current.get(0)
        return proc is not None and proc.alive

    if TYPE_CHECKING:  # the signatures, for type checkers

        @overload
        def call(self, fn: Task[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...
        @overload
        def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...
        @overload
        def call(self, fn: str, /, *args: Any, **kwargs: Any) -> Any: ...

    def call(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """``submit(...).result()``: run the call and return its value (or raise)."""
        target, timeout, retries = call_settings(fn)
        future = self._engine.submit(
            target, args, kwargs, timeout=timeout, retries=retries, wait=True
        )
        return future.result()

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Finish the running and queued calls, then let the process exit.

        Args:
            wait: block until the process has exited.
            timeout: with ``wait``, kill the process after this many seconds.
        """
        self._finalizer.detach()
        self._engine.shutdown(wait=wait, cancel_futures=False, timeout=timeout)

    def kill(self) -> None:
        """Kill the process (and its process group) now; running calls fail with
        :class:`~offload.WorkerKilled`. The next call starts a fresh process."""
        self._engine.kill_all()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled, a handle travels: unpickled anywhere, it is a connection to this
        worker (:func:`connect`), whose calls run in this worker's process.

        A local worker opens its listener (``127.0.0.1``, a free port, a fresh token)
        the first time its handle is pickled, and pickling waits for the calls sent to
        it before (ordinary workers pay nothing). From then on ``concurrency`` holds for
        the calls of every holder together. The listener is its process's: when the
        worker process is replaced (a crash, ``kill()``, ``max_tasks``, a timeout), the
        holders of handles pickled before see :class:`~offload.ConnectionLost` for the
        calls they had running (and :class:`~offload.NoWorkerAvailable` for later ones:
        nothing listens there any more), and a handle pickled after connects to the new
        process. A handle of a worker server's
        worker (``connect``) pickles to a connection to that server.

        Raises:
            TypeError: a worker started over ssh (its listener would not be reachable).
            StartError, ExecutionError: the worker could not open its listener.
        """
        remote = self._remote
        if instance_of(remote, "offload.client.remote", "RemoteTarget"):
            from offload.client.remote import RemoteTarget  # loaded: it made the target

            assert isinstance(remote, RemoteTarget)
            return (_travelled, (str(remote.address), remote.token, remote.tls, self.name))
        if remote is not None:
            raise TypeError(f"the handle of worker {self.name}, started over ssh, cannot travel")
        address, token = _listener_of(self)
        return (_travelled, (address, token, None, self.name))

    def __repr__(self) -> str:
        counts = self._engine.scheduler.counts()
        state = "alive" if self.alive else "stopped" if self._engine.scheduler.closed else "idle"
        return (
            f"<Worker {self.name} pid={self.pid} {state} running={counts.running} "
            f"queued={counts.queued}>"
        )


# The task that opens a worker's listener (offload.server.host.listen_here), called by
# name: the client side never imports the server side; the worker imports it on demand.
LISTEN_TASK = "offload.server.host:listen_here"
_listeners_lock = threading.Lock()
# worker handle -> (the pid its listener runs in, its address, its token)
_listeners: weakref.WeakKeyDictionary[Worker, tuple[int | None, str, bytes]] = (
    weakref.WeakKeyDictionary()
)


def _listener_of(worker: Worker) -> tuple[str, bytes]:
    """The address and token of the listener of ``worker``'s current process, opened
    if it has none yet."""
    import os

    with _listeners_lock:
        known = _listeners.get(worker)
        pid = worker.pid
        if known is not None and known[0] == pid and pid is not None:
            return known[1], known[2]
        token = known[2] if known is not None else os.urandom(32).hex().encode()
        address = worker._engine.submit(LISTEN_TASK, (token,), {}).result()
        _listeners[worker] = (worker.pid, address, token)
        return address, token


def _travelled(address: str, token: bytes, tls: TLS | None, name: str) -> Worker:
    """A worker handle unpickled: a connection to that worker (made in the background;
    calls wait for it)."""
    from offload.client.remote import RemoteTarget

    opts = make_options(name=name)
    return Worker(opts, wait=False, remote=RemoteTarget.parse(address, token, tls, None))


def spawn(**options: Any) -> Worker:
    """Start a worker process and return its handle once it is ready.

    Args:
        **options: worker options (SPEC section 4): ``name``, ``start_method``
            (``"spawn"``, ``"forkserver"``, ``"fork"``, ``"reexec"`` or ``"attach"``: a
            worker you start by hand; on Python 3.12+
            ``"fork"`` makes ``os.fork()`` issue a ``DeprecationWarning``, see
            :class:`~offload.client.options.WorkerOptions`), ``python``, ``preload``,
            ``initializer``, ``initargs``, ``env``, ``cwd``, ``umask``, ``stdout``,
            ``stderr``, ``concurrency``, ``max_tasks``, ``memory_limit``,
            ``start_timeout``, ``heartbeat``, ``max_message_size``, ``on_failure``,
            ``shutdown_on``, ``where`` (``"host:port"`` of a worker server, or
            ``offload.SSH(host, ...)``: a worker server with ``concurrency`` worker
            processes started over ssh, which ends with the handle; ``preload`` and
            ``env`` apply there, ``w.pid`` is that server's pid).

    Raises:
        StartError: the process could not start, its initializer raised, or it did not
            finish the handshake within ``start_timeout``; over ssh also: ssh failed
            (refused key, unreachable host) or the remote Python is missing or of
            another version (the message quotes what ssh and the remote side said).
        VersionMismatch: ``python`` runs another Python or offload version.
        TypeError: an unknown option or one of the wrong type (e.g. ``name=123``).
        ValueError: an option with a bad value (e.g. ``concurrency=0``). Every option
            is checked before the process starts.
    """
    token = options.pop("token", None)
    tls = options.pop("tls", None)
    check_token("token", token)
    check_tls("tls", tls)
    opts = make_options(**options)
    if opts.where is not None:
        # Over ssh, one worker: a server with `concurrency` worker processes.
        target = remote_target(opts, opts.where, token, tls, workers=opts.concurrency)
        return Worker(opts, remote=target)
    return Worker(opts.with_name(opts.name))


def connect(
    address: str,
    *,
    token: bytes | str | None = None,
    tls: TLS | None = None,
    **options: Any,
) -> Worker:
    """A worker handle whose calls run on the worker server at ``address``.

    Args:
        address: ``host:port``, ``[v6]:port`` or ``unix:PATH`` of an ``offload serve``.
        token: the server's token (default: ``OFFLOAD_TOKEN``, or the file named by
            ``OFFLOAD_TOKEN_FILE``). Anyone holding it can run code on the server.
        tls: TLS settings (``offload.TLS(ca=..., cert=..., key=...)``).
        **options: worker options that apply to a remote worker: ``name``,
            ``start_timeout``, ``heartbeat`` (default ``(5, 30)``), ``max_message_size``,
            ``on_failure``, and ``stdout``/``stderr``: where the output of its calls,
            which the server relays, goes (as for a local worker's).

    Raises:
        AuthenticationError: no token, a wrong token, an impostor server, or TLS failed.
        VersionMismatch: the server runs other offload/protocol/Python versions.
        NoWorkerAvailable: the server cannot be reached.
        TypeError: an unknown option or one of the wrong type (e.g. ``address=1111``).
        ValueError: an option with a bad value (e.g. a malformed address).
    """
    check_connect_args(address, token, tls)
    opts = make_options(**options)
    from offload.client.remote import RemoteTarget

    target = RemoteTarget.parse(address, token, tls, opts.heartbeat)
    return Worker(opts, remote=target)


_delegate_defaults: dict[str, Any] = {}
_delegate_remote: Worker | None = None
_delegate_lock = threading.Lock()


def set_delegate_defaults(**options: Any) -> None:
    """Options every :func:`delegate` call uses (set by ``offload.init``); with
    ``where="host:port"`` (and ``token``), delegated calls go to that worker server."""
    global _delegate_remote
    with _delegate_lock:
        _delegate_defaults.clear()
        _delegate_defaults.update(options)
        old, _delegate_remote = _delegate_remote, None
    if old is not None:
        old.shutdown(wait=False)


_CALL_OPTIONS = ("timeout", "retries")


class Delegate:
    """``offload.delegate``: start a call at once in a fresh worker process of its own
    (Procord's ``delegate``); the process exits when the call is done.

    ``offload.delegate(fn, *args, **kwargs)`` runs with the defaults ``offload.init()``
    set; ``offload.delegate.options(timeout=5, retries=1, name="crunch", env={...})``
    returns a ``delegate`` with per-call options (``timeout``, ``retries``) and worker
    options (those of :func:`offload.spawn`) on top, as ``task.options(...)`` does for
    a task.
    """

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self._options = dict(options or {})

    def options(self, **options: Any) -> Delegate:
        """A ``delegate`` with these options on top of this one's.

        Raises:
            TypeError: an unknown option or one of the wrong type.
            ValueError: an option with a bad value.
        """
        merged = {**self._options, **options}
        call = {k: v for k, v in merged.items() if k in _CALL_OPTIONS}
        if call:
            from offload.tasks import Task

            Task(_check_only, register=False, **call)
        worker = {k: v for k, v in merged.items() if k not in (*_CALL_OPTIONS, "token", "tls")}
        make_options(**worker)  # checked now, not at the first call
        return Delegate(merged)

    def __call__(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Start ``fn(*args, **kwargs)`` now and return its future.

        After ``offload.init()`` with ``--offload-host`` (or ``where=``), the call goes to
        that worker server instead, over one connection shared by every delegated call
        (the server runs each call in an isolated process). Use a :class:`~offload.Pool`
        to reuse local processes across calls.

        Returns:
            The call's future.

        Raises:
            RuntimeError: in a process forked from the one whose server connection it is.
        """
        global _delegate_remote
        target, timeout, retries = call_settings(fn)
        options = {**_delegate_defaults, **self._options}
        timeout = options.pop("timeout", timeout)
        retries = options.pop("retries", retries)
        if options.get("where"):
            if self._options:  # its own worker options: its own connection
                token = options.pop("token", None)
                tls = options.pop("tls", None)
                opts = make_options(**options)
                assert opts.where is not None
                target_ = remote_target(opts, opts.where, token, tls, workers=opts.concurrency)
                worker = Worker(opts, wait=False, remote=target_)
                return _run_once(worker, target, args, kwargs, timeout=timeout, retries=retries)
            with _delegate_lock:
                remote = _delegate_remote
                if remote is None:
                    token = options.pop("token", None)
                    tls = options.pop("tls", None)
                    opts = make_options(**options)
                    assert opts.where is not None
                    shared = remote_target(opts, opts.where, token, tls)
                    remote = _delegate_remote = Worker(opts, wait=False, remote=shared)
            return remote._engine.submit(target, args, kwargs, timeout=timeout, retries=retries)
        options.pop("token", None)
        options.pop("tls", None)
        opts = make_options(**{**options, "max_tasks": 1})  # one process per call
        worker = Worker(opts.with_name(opts.name), wait=False)
        return _run_once(worker, target, args, kwargs, timeout=timeout, retries=retries)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._options.items() if k not in ("token", "tls")}
        return f"<offload.delegate options={shown}>"


def _check_only() -> None:
    """Stands in for a function when a Delegate checks its call options."""


def _run_once(
    worker: Worker,
    target: Any,
    /,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    timeout: float | None,
    retries: int,
) -> Future[Any]:
    """Submit one call to ``worker``, which is shut down once the call has resolved."""
    engine = worker._engine
    future = engine.submit(target, args, kwargs, timeout=timeout, retries=retries)
    worker._finalizer.detach()
    future.add_done_callback(lambda _: engine.shutdown_dropped(True))
    return future


delegate = Delegate()
