"""``offload.Actor``: stateful workers whose handles travel (SPEC section 8).

::

    class Counter(offload.Actor):
        def __init__(self, start: int = 0) -> None:
            self.n = start

        def add(self, k: int) -> int:
            self.n += k
            return self.n

    c = Counter.spawn(5)                  # a worker process holding one Counter(5)
    c.add(2).result()                     # 7: method calls return offload.Futures
    c.call(Counter.add, 2).result()       # 9: the same, typed without the mypy plugin
    pool.submit(use_counter, c)           # the handle travels: the task calls c there
    c.shutdown()

Theory of operation
-------------------
1. ``Counter.spawn(...)`` starts a worker process like :func:`offload.spawn` (same
   options, same start methods) whose initializer
   (:func:`offload.server.host.start_actor`) builds the instance and opens a listener
   for the other holders of the handle, on ``listen`` (``127.0.0.1:0``) with a fresh
   random token. The creator's calls take the worker's own channel: an actor call costs
   what a pool call to one worker costs. A method call is a call of
   :func:`offload.worker.actor.actor_method` with the method's name.
2. A handle pickles to (class, address, token, name, pid). Unpickled anywhere -- a task
   on another worker, a worker of an ``offload serve``, another actor, a program that
   loaded it from a file -- it connects to the address and proves the token, as
   :func:`offload.connect` does, and calls the actor through that connection. Each
   connection's calls start in the order it sent them; one gate in the actor's process
   holds ``concurrency`` for all of them (see :mod:`offload.server.host`).
3. Death is final (:mod:`offload.client.stateful`): when the actor's process dies, the
   calls running or waiting there fail with ``WorkerCrashed`` (signal, exit status,
   stderr), ``on_failure`` fires once, and every later call fails with the same story;
   nothing is restarted. A method that raises is just a call that raised.
4. ``shutdown_on``: ``"parent_exit"`` (default): the actor ends with its creator, even a
   SIGKILLed one (the worker's lifeline), and when the creator's handle is shut down or
   dropped. ``"heartbeat_timeout"``: also when the creator stops answering heartbeats.
   ``"explicit"``: it outlives its creator and ends only by ``shutdown()`` (or
   ``kill()``) through any handle; ``handle_file=PATH`` writes its handle there (0600)
   for others to :meth:`Actor.load`.
5. ``Counter.serve(...)`` hosts an instance in the calling process (threads of its own)
   and returns a handle that this process and others can use.
6. ``where=offload.SSH(...)``: the actor's process is started over ssh (the slot is an
   :class:`~offload.client.ssh.SSHSlot` whose entry point is
   :func:`offload.server.actor_over_ssh.serve`, wrapped by ``StatefulSlots`` as any
   actor's). It builds the instance there and hosts it with the same
   :class:`~offload.server.host.Host` as ``serve``, on a Unix socket that ssh forwards
   here: the creator's calls, too, go through that socket, and ``address`` is its end
   here (a handle pickled from it works on this machine). ``pid`` is the remote
   process's. It ends with the ssh connection (the creator's exit, ``kill()``, a drop:
   ``ConnectionLost``); the creator's ``shutdown()`` asks it to stop as a holder's does,
   so every holder's received calls finish first. ``shutdown_on="explicit"`` is refused
   (it cannot outlive its ssh connection); ``"heartbeat_timeout"`` ends it when its
   creator's connection has been silent for the heartbeat timeout.

Security: a handle carries the actor's token, and whoever holds it can run any code in
the actor's process (calls are pickles). Keep handle files private (they are written
0600, and :meth:`Actor.load` refuses one that others may read or write).

Typing: method calls are typed for mypy by the plugin ``offload.mypy_plugin``
(``plugins = ["offload.mypy_plugin"]``): ``c.add`` is then
``Callable[[int], offload.Future[int]]``. Without it, ``c.add`` is ``Any``, and
``c.call(Counter.add, 2)`` is the typed spelling (``Future[int]``).
"""

from __future__ import annotations

import inspect
import itertools
import os
import pickle
import stat
import threading
import weakref
from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from offload._record import replace
from offload.client import lifetime, outcome
from offload.client.engine import Engine
from offload.client.future import Future
from offload.client.options import (
    ActorOptions,
    WorkerOptions,
    make_actor_options,
    make_options,
)
from offload.client.remote import DEFAULT_HEARTBEAT, RemoteTarget
from offload.client.ssh import SSHSlot, SSHTarget
from offload.client.stateful import StatefulSlots
from offload.client.worker import slot_factory
from offload.errors import (
    AuthenticationError,
    ConnectionLost,
    NoWorkerAvailable,
    WorkerCrashed,
    WorkerKilled,
)
from offload.serde import culprit, dumps
from offload.server.actor_over_ssh import ENTRY as SSH_ENTRY
from offload.server.actor_over_ssh import encode_start
from offload.server.host import (
    DRAIN_TIMEOUT,
    ActorStart,
    Host,
    control,
    hosted_address,
    serve_actor,
    start_actor,
)
from offload.tokens import write_private_file
from offload.transport.ssh import SSH
from offload.worker.actor import actor_method

A = TypeVar("A", bound="Actor")
P = ParamSpec("P")
T = TypeVar("T")

# The options serve() takes (it starts no process: the others do not apply).
_SERVE_OPTIONS = frozenset({"name", "concurrency", "handle_file", "max_message_size", "listen"})
# How long a holder's shutdown() waits, by default, for the actor to close its
# connection after it agreed to stop.
_GONE_TIMEOUT = DRAIN_TIMEOUT + 5.0
_names = itertools.count(1)
_methods_lock = threading.Lock()
_methods: dict[type, dict[str, str]] = {}  # class -> name -> "method" or what else it is


def _new_token() -> bytes:
    return os.urandom(32).hex().encode()


def _members(cls: type) -> dict[str, str]:
    """What each public name (no leading underscore) of ``cls`` is: ``"method"``, or
    another kind (a property, an attribute), for the error that says it cannot be
    called through a handle."""
    with _methods_lock:
        found = _methods.get(cls)
        if found is not None:
            return found
    kinds: dict[str, str] = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue  # private by convention: not part of what a handle offers
        value = inspect.getattr_static(cls, name)
        if isinstance(value, (staticmethod, classmethod)) or inspect.isfunction(value):
            kinds[name] = "method"
        elif isinstance(value, property):
            kinds[name] = "property"
        elif callable(value):
            kinds[name] = "method"
        else:
            kinds[name] = "class attribute"
    with _methods_lock:
        _methods[cls] = kinds
    return kinds


class Actor:
    """Base class of actors: a class whose instance lives in a worker process of its
    own (or is served by this one), called through a handle (SPEC section 8).

    Subclass it, then ``MyActor.spawn(*args, **kwargs)`` (or
    ``MyActor.options(...).spawn(...)``) starts a process holding ``MyActor(*args,
    **kwargs)`` and returns an :class:`ActorHandle`. Its public methods are called
    through the handle: ``handle.method(...)`` returns an :class:`offload.Future`.
    Calls run one at a time, in the order each caller made them, unless
    ``concurrency > 1``. The class must be importable by the worker (or defined in
    ``__main__``: it then travels by value). A method must not wait for another call to
    its own actor: with ``concurrency=1`` that call waits for the method to end.
    """

    @classmethod
    def spawn(cls: Callable[P, A], *args: P.args, **kwargs: P.kwargs) -> ActorHandle[A]:
        """Start a worker process holding ``cls(*args, **kwargs)``; its handle, once
        the instance is built and its listener open.

        Raises:
            StartError: the process could not start, or ``__init__`` (or the
                ``initializer``) raised: the message carries its traceback.
            SerializationError: the arguments cannot be pickled.
        """
        return ActorLauncher(cls, {}).spawn(*args, **kwargs)

    @classmethod
    def options(cls: Callable[P, A], **options: Any) -> ActorLauncher[P, A]:
        """The actor with these options, checked now: those of :func:`offload.spawn`
        (``name``, ``start_method``, ``env``, ``concurrency``, ``heartbeat``,
        ``on_failure``, ``shutdown_on``, ...) and:

        * ``listen``: where the actor listens for the holders of its handle other than
          its creator (default ``"127.0.0.1:0"``: this machine, a free port; a unix
          socket as ``"unix:PATH"``).
        * ``handle_file``: a path where the handle is written (mode 0600) once the
          actor runs, for :meth:`Actor.load` (or ``pickle.load``) in other programs;
          what ``shutdown_on="explicit"`` actors are usually found by.

        ``shutdown_on="explicit"`` makes an actor that outlives its creator (its
        standard output and error are then discarded) and ends only through
        ``shutdown()`` or ``kill()`` of a handle. ``max_tasks`` and ``memory_limit``
        are refused: an actor's process is never replaced.

        ``where=offload.SSH(host, ...)`` runs the actor on that machine, started over
        ssh; it ends with that ssh connection, so ``shutdown_on="explicit"`` (and
        ``listen``: its address is the socket ssh forwards here) are refused with it.

        Raises:
            TypeError: an unknown option, or one of the wrong type.
            ValueError: an option with a bad value, or one an actor cannot have.
        """
        return ActorLauncher(cls, options)

    @classmethod
    def serve(
        cls: type[A], *args: Any, listen: str = "127.0.0.1:0", **kwargs: Any
    ) -> ActorHandle[A]:
        """Host ``cls(*args, **kwargs)`` in this process, on threads of its own, and
        return its handle, which this process and others (pickled) can use.

        ``listen`` (``"host:port"``, ``"[v6]:port"`` or ``"unix:PATH"``) is where the
        others connect; it is not passed to the class (typing: the constructor's
        arguments are not checked here, unlike ``spawn``'s). ``handle.shutdown()``
        stops serving; the process goes on. A served actor dies with this process.

        Raises:
            OSError: the address cannot be listened on.
            Exception: whatever the class's ``__init__`` raises.
        """
        return ActorLauncher(cls, {}).serve(*args, listen=listen, **kwargs)

    @staticmethod
    def load(path: str | os.PathLike[str]) -> ActorHandle[Any]:
        """The handle written to ``path`` (``handle_file=`` or :meth:`ActorHandle.save`);
        it connects to the actor when first used.

        Raises:
            AuthenticationError: the file is open to its group or others (it holds the
                actor's token; and whoever can write it can make this program unpickle
                anything).
            OSError: the file cannot be read.
            TypeError: the file holds something else than an actor handle.
        """
        with open(path, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            if mode & 0o077:
                raise AuthenticationError(
                    f"the handle file {os.fspath(path)} is open to others (mode "
                    f"{mode:04o}): loading it would unpickle what they wrote, and it holds "
                    f"the actor's token. Make it private: chmod 600 {os.fspath(path)}"
                )
            handle = pickle.load(f)  # a private file (checked above), written by a handle
        if not isinstance(handle, ActorHandle):
            raise TypeError(
                f"{os.fspath(path)} holds a {type(handle).__name__}, not an actor handle"
            )
        return handle


class ActorLauncher(Generic[P, A]):
    """An actor class with options, from ``MyActor.options(...)``: ``spawn`` and
    ``serve`` start it with them; ``options`` adds more."""

    def __init__(self, cls: Callable[P, A], options: dict[str, Any]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Actor)):
            raise TypeError(f"{cls!r} is not a subclass of offload.Actor")
        self._cls: type[A] = cls  # type: ignore[assignment]
        self._options = dict(options)
        self._checked = make_actor_options(**self._options)  # checked now, not at start

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._options.items()}
        return f"<ActorLauncher {self._cls.__qualname__} options={shown}>"

    def options(self, **options: Any) -> ActorLauncher[P, A]:
        """These options on top of the ones given already.

        Raises:
            TypeError, ValueError: as for :meth:`Actor.options`.
        """
        return ActorLauncher(self._cls, {**self._options, **options})

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> ActorHandle[A]:
        """Start the actor in a process of its own; see :meth:`Actor.spawn`.

        Raises:
            StartError, SerializationError: see :meth:`Actor.spawn`.
        """
        cls = self._cls
        opts = self._checked
        name = opts.name or f"{cls.__name__}-{next(_names)}"
        token = _new_token()
        start = ActorStart(
            cls=cls,
            args=tuple(args),
            kwargs=dict(kwargs),
            token=token,
            name=name,
            listen=opts.listen,
            concurrency=opts.concurrency,
            max_message_size=opts.max_message_size,
            initializer=opts.initializer,
            initargs=opts.initargs,
        )
        try:
            dumps(start)  # arguments that cannot travel fail here, not in the I/O thread
        except BaseException as exc:  # noqa: BLE001 - SystemExit from __reduce__ too
            raise outcome.unpicklable_argument(
                outcome.describe_call(cls, tuple(args), dict(kwargs)),
                culprit((args, kwargs)),
                exc,
            ) from None
        over_ssh = isinstance(opts.where, SSH)
        if over_ssh:
            # The actor's process is the remote entry point itself (it runs the
            # initializer and builds the instance there); its one client here is a
            # connection to its listener through the socket ssh forwards.
            worker_options = replace(opts, name=name, initializer=None, initargs=())
            engine, slots = _engine(worker_options, name, _ssh_target(opts, start))
        else:
            worker_options = replace(opts, name=name, initializer=start_actor, initargs=(start,))
            engine, slots = _engine(worker_options, name, None)
        explicit = opts.shutdown_on == "explicit"
        if explicit:
            lifetime.forget(engine)  # the creator's exit must not stop it
        engine.start()
        try:
            engine.wait_ready()
            first = slots.first
            if isinstance(first, SSHSlot) and first.launch is not None:
                address = first.launch.address  # the forwarded socket, on this machine
            else:
                address = engine.submit(hosted_address, (), {}).result()
        except BaseException:
            engine.shutdown(wait=True, cancel_futures=True, timeout=0)
            raise
        engine.stop_keeping_warm()  # never restarted anyway: see StatefulSlots
        handle: ActorHandle[A] = ActorHandle(
            cls,
            engine,
            slots,
            name=name,
            address=address,
            token=token,
            pid=first.pid if first is not None else None,
            role="creator",
            stop_when_dropped=not explicit,
            over_ssh=over_ssh,
        )
        if opts.handle_file is not None:
            handle.save(opts.handle_file)
        return handle

    def serve(self, *args: Any, listen: str | None = None, **kwargs: Any) -> ActorHandle[A]:
        """Host the actor in this process; see :meth:`Actor.serve` (``listen`` here
        overrides the ``listen`` option).

        Raises:
            ValueError: an option that only applies to a process of its own.
            OSError: the address cannot be listened on.
            Exception: whatever the class's ``__init__`` raises.
        """
        options = dict(self._options)
        if listen is not None:
            options["listen"] = listen
        wrong = sorted(set(options) - _SERVE_OPTIONS)
        if wrong:
            raise ValueError(
                f"serve() runs the actor in this process: {', '.join(wrong)} only apply "
                f"to spawn() (serve takes {', '.join(sorted(_SERVE_OPTIONS))})"
            )
        opts = make_actor_options(**options)
        cls = self._cls
        name = opts.name or f"{cls.__name__}-{next(_names)}"
        instance = cls(*args, **kwargs)
        token = _new_token()
        host = serve_actor(
            instance,
            listen=opts.listen,
            token=token,
            name=name,
            concurrency=opts.concurrency,
            max_message_size=opts.max_message_size,
        )
        try:
            handle = _connected(
                cls, str(host.address), token, name, os.getpid(), host=host, role="server"
            )
            if opts.handle_file is not None:
                handle.save(opts.handle_file)
        except BaseException:
            host.stop(0)
            raise
        return handle


class ActorMethod(Generic[P, T]):
    """A method of an actor, through its handle: calling it returns a Future."""

    __slots__ = ("_handle", "_name")

    def __init__(self, handle: ActorHandle[Any], name: str) -> None:
        self._handle = handle
        self._name = name

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Call the method in the actor; its future.

        Raises:
            RuntimeError: the handle was shut down.
        """
        return self._handle._submit(self._name, args, kwargs)

    def __repr__(self) -> str:
        return f"<ActorMethod {self._handle._cls.__qualname__}.{self._name} of {self._handle.name}>"


class ActorHandle(Generic[A]):
    """A handle on one actor: its methods return :class:`offload.Future` objects.

    ``handle.add(2)`` calls ``add(2)`` on the actor and returns its future (typed by
    the ``offload.mypy_plugin`` mypy plugin); ``handle.call(Counter.add, 2)`` is the
    same call typed without it. A name that is not a public method of the actor's
    class is an ``AttributeError`` here, at the call site. Calls have no per-call
    timeout (a timeout would kill the actor's process, and its state): wait with
    ``future.result(timeout)``, or ``kill()`` the actor. A method whose name is also
    a name of the handle (``shutdown``, ``kill``, ``call``, ``pid``, ...) is called
    with ``handle.call``.

    Picklable: pickled (as an argument of a task, or with :meth:`save`), it becomes a
    handle that connects to the actor's address with its token wherever it is
    unpickled. Whoever holds it can run code in the actor's process.

    Thread-safe. Made by :meth:`Actor.spawn`, :meth:`Actor.serve` and
    :meth:`Actor.load`, not directly.
    """

    def __init__(
        self,
        cls: type[A],
        engine: Engine,
        slots: StatefulSlots,
        *,
        name: str,
        address: str,
        token: bytes,
        pid: int | None,
        role: str,
        stop_when_dropped: bool = True,
        host: Host | None = None,
        over_ssh: bool = False,
    ) -> None:
        self._cls = cls
        self._engine = engine
        self._slots = slots
        self._name = name
        self._address = address
        self._token = token
        self._pid = pid
        self._role = role  # "creator", "holder" (connected) or "server" (served here)
        self._host = host
        self._over_ssh = over_ssh  # the creator's handle of an actor started over ssh
        self._members = _members(cls)
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if stop_when_dropped:
            self._finalizer = weakref.finalize(self, _drop, engine, host)

    # -- calls ---------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        """The actor's method ``name`` (see :class:`ActorMethod`).

        Raises:
            AttributeError: ``name`` is not a public method of the actor's class.
        """
        members = self.__dict__.get("_members")
        cls = self.__dict__.get("_cls")
        if (name.startswith("__") and name.endswith("__")) or members is None or cls is None:
            raise AttributeError(name)  # copy, pickle and friends probing; or half-made
        kind = members.get(name)
        if kind != "method":
            raise AttributeError(outcome.not_a_method(cls.__qualname__, name, kind))
        method: ActorMethod[..., Any] = ActorMethod(self, name)
        self.__dict__[name] = method  # found directly from now on: no __getattr__
        return method

    def call(
        self, method: Callable[Concatenate[A, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Future[T]:
        """Call ``method`` (a method of the actor's class, as ``Counter.add``) with the
        arguments in the actor; typed: ``handle.call(Counter.add, 2)`` is a
        ``Future[int]`` when ``add`` returns an int.

        Raises:
            AttributeError: ``method`` is not a public method of the actor's class.
            RuntimeError: the handle was shut down.
        """
        name = getattr(method, "__name__", None)
        kind = self._members.get(name) if isinstance(name, str) else None
        if kind != "method" or getattr(self._cls, str(name), None) != method:
            raise AttributeError(
                outcome.not_a_method(self._cls.__qualname__, str(name or method), kind)
            )
        return self._submit(str(name), args, kwargs)

    def _submit(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        engine = self._engine
        if self._slots.end is not None or engine.scheduler.closed:
            return self._refuse()
        return engine.submit(actor_method, (name, *args), kwargs)

    def _refuse(self) -> Future[Any]:
        """A call after the end: the handle was shut down (raise), or the actor is gone
        (a future that fails at once with the story of its end, nothing started).

        Raises:
            RuntimeError: this handle was shut down.
        """
        if self._engine.scheduler.closed:
            raise RuntimeError(f"cannot call actor {self._name}: this handle was shut down")
        future: Future[Any] = Future()
        error = self._slots.error()
        assert error is not None
        future._resolve_exception(error, task_raised=False)
        return future

    # -- state ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The actor's name (in errors, logs and its process title)."""
        return self._name

    @property
    def pid(self) -> int | None:
        """The pid of the actor's process (it never changes: the actor is never
        restarted)."""
        return self._pid

    @property
    def address(self) -> str:
        """Where the actor listens for the holders of its handle (``host:port`` or
        ``unix:PATH``)."""
        return self._address

    @property
    def actor_class(self) -> type[A]:
        """The actor's class."""
        return self._cls

    @property
    def alive(self) -> bool:
        """Whether the actor is up as far as this handle knows (a holder's handle
        learns of its death when its connection drops)."""
        if self._slots.dead or self._engine.scheduler.closed:
            return False
        first = self._slots.first
        return first is None or first.alive

    def __repr__(self) -> str:
        closed = self._engine.scheduler.closed
        state = "shut down" if closed else "alive" if self.alive else "dead"
        return (
            f"<ActorHandle {self._cls.__qualname__} {self._name!r} {state} pid={self._pid} "
            f"address={self._address} pending={self._engine.in_flight} role={self._role}>"
        )

    # -- the end -------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """End the actor gracefully: the calls it has received (from every holder)
        finish, then it stops. Through any handle: the creator's, a holder's, or the
        serving process's. The calls made through this handle before finish first.

        Args:
            wait: block until it has stopped (its process exited; for a holder: until
                the actor closed this connection).
            timeout: with ``wait``, after this many seconds kill it (creator) or stop
                waiting (holder).
        """
        if self._finalizer is not None:
            self._finalizer.detach()
        engine = self._engine
        if self._role == "creator":
            if self._over_ssh:
                self._shutdown_over_ssh(wait=wait, timeout=timeout)
                return
            engine.shutdown(wait=wait, cancel_futures=False, timeout=timeout)
            return
        if self._role == "server":
            engine.shutdown(wait=wait, cancel_futures=False, timeout=timeout)
            assert self._host is not None
            self._host.stop(DRAIN_TIMEOUT if timeout is None else timeout)
            return
        self._ask("shutdown", wait=wait, timeout=timeout)

    def kill(self) -> None:
        """End the actor now: its running calls fail (``WorkerKilled`` on this handle,
        ``WorkerCrashed``/``ConnectionLost`` on others), and so does every later call.
        A served actor stops serving (its running calls cannot be killed: they run on
        threads of the serving process, and finish unseen)."""
        if self._role == "creator":
            self._engine.kill_all()
            return
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._role == "server":
            self._engine.abort(wait=False)
            assert self._host is not None
            self._host.stop(0)
            return
        self._ask("kill", wait=False, timeout=None)

    def close(self) -> None:
        """Stop using this handle, and leave the actor running: a holder's connection
        closes once the calls made through it are done. (The creator's handle of a
        ``parent_exit`` actor is the actor's lifeline: closing it shuts the actor
        down; an ``explicit`` actor's creator just lets go.)"""
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._role == "creator" and self._finalizer is None:  # explicit: let go
            return
        self._engine.shutdown(wait=True, cancel_futures=False, timeout=None)

    def _shutdown_over_ssh(self, *, wait: bool, timeout: float | None) -> None:
        """The creator's shutdown of an actor over ssh: as a holder's (the actor lets
        every holder's received calls finish, then ends, and ssh with it), its end
        expected (no ``on_failure``); closing ssh directly would kill it at once."""
        engine = self._engine
        engine.wait_calls(timeout)  # this handle's calls first, in their order
        first = self._slots.first
        answered = True
        if first is not None and not self._slots.dead and not engine.scheduler.closed:
            first.expected_exit = True  # the end that follows is this shutdown
            answered = False
            try:
                engine.submit(control, ("shutdown",), {}).result(
                    _GONE_TIMEOUT if timeout is None else timeout
                )
                answered = True
            except (ConnectionLost, WorkerCrashed, NoWorkerAvailable, WorkerKilled):
                answered = True  # it went before it could answer, or was gone already
            except TimeoutError:
                pass  # unanswered: the engine's shutdown kills it
            if answered and wait:
                self._slots.ended.wait(_GONE_TIMEOUT if timeout is None else timeout)
        engine.shutdown(wait=wait, cancel_futures=True, timeout=timeout if answered else 0)

    def _ask(self, request: str, *, wait: bool, timeout: float | None) -> None:
        """A holder's shutdown or kill: ask the actor, then close this connection."""
        engine = self._engine
        if request == "shutdown":
            engine.wait_calls(timeout)  # this handle's calls first, in their order
        try:
            engine.submit(control, (request,), {}).result(timeout)
        except (ConnectionLost, WorkerCrashed, NoWorkerAvailable):
            pass  # it went before it could answer, or was gone already
        if wait and request == "shutdown":
            self._slots.ended.wait(_GONE_TIMEOUT if timeout is None else timeout)
        engine.shutdown(wait=wait, cancel_futures=True, timeout=0 if not wait else timeout)

    def __enter__(self) -> ActorHandle[A]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._role == "holder":
            self.close()
        else:
            self.shutdown()

    # -- travelling ----------------------------------------------------------------------

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (self._cls, self._address, self._token, self._name, self._pid),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this handle to ``path`` (mode 0600, replaced atomically) for
        :meth:`Actor.load` or ``pickle.load`` in another program.

        Raises:
            OSError: the file cannot be written.
        """
        data, buffers = dumps(self)
        assert not buffers
        write_private_file(os.fspath(path), [data])


def _ssh_target(opts: ActorOptions, start: ActorStart) -> SSHTarget:
    """The slot target of an actor over ssh: the remote entry
    :func:`offload.server.actor_over_ssh.serve` with the pickled ``start``, and the
    handle's token (the one its copies carry)."""
    where = opts.where
    assert isinstance(where, SSH)
    settings = encode_start(replace(start, token=b"", listen=""))  # the token: over stdin
    heartbeat = opts.heartbeat or DEFAULT_HEARTBEAT
    if opts.shutdown_on == "heartbeat_timeout":
        settings["heartbeat"] = list(heartbeat)
    return SSHTarget(
        where,
        heartbeat=heartbeat,
        preload=tuple(opts.preload),
        env=opts.env,
        entry=SSH_ENTRY,
        settings=settings,
        token=start.token,
    )


def _drop(engine: Engine, host: Host | None) -> None:
    """A handle dropped without shutdown(): stop what it owns (from any thread)."""
    engine.shutdown_dropped(False)
    if host is not None:
        threading.Thread(target=host.stop, args=(0.0,), daemon=True).start()


def _engine(
    options: WorkerOptions, name: str, target: RemoteTarget | SSHTarget | None
) -> tuple[Engine, StatefulSlots]:
    """The engine of an actor handle and its slots: one worker, never replaced. It is a
    local process started with ``options``, or with ``target`` a connection to the actor
    (through a listener, or a socket ssh forwards) that ends independently."""
    slots = StatefulSlots(slot_factory({} if target is None else {0: target}))
    engine = Engine(
        options,
        1,
        keep_warm=True,
        max_start_failures=1,
        label=name,
        names=[name],
        slot_factory=slots,
        independent=() if target is None else (0,),
    )
    return engine, slots


def _rebuild(
    cls: type[A], address: str, token: bytes, name: str, pid: int | None
) -> ActorHandle[A]:
    """Unpickling a handle: one that connects to the actor (when first used)."""
    return _connected(cls, address, token, name, pid, role="holder")


def _connected(
    cls: type[A],
    address: str,
    token: bytes,
    name: str,
    pid: int | None,
    *,
    role: str,
    host: Host | None = None,
) -> ActorHandle[A]:
    options: WorkerOptions = make_options(name=name)
    engine, slots = _engine(options, name, RemoteTarget.parse(address, token, None, None))
    engine.start()  # connects in the background; calls wait for it
    engine.stop_keeping_warm()
    return ActorHandle(
        cls, engine, slots, name=name, address=address, token=token, pid=pid, role=role, host=host
    )
