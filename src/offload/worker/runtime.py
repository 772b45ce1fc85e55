"""The code that runs inside a worker process.

Theory of operation
-------------------
The parent starts the worker with one end of a socketpair (its number and the worker's
settings are in the ``OFFLOAD_WORKER`` environment variable, as JSON). That socket carries
only protocol frames; the worker's stdout and stderr are separate, so nothing a task
prints can corrupt the channel.

1. The worker applies its settings (``sys.path``, process title, faulthandler), imports
   the ``preload`` modules and sends its :class:`Hello`.
2. A reader thread decodes frames. ``Call`` messages go to a FIFO queue that
   ``concurrency`` executor threads drain (the main thread is one of them, so tasks
   that install signal handlers work). ``Ping`` is answered at once by the reader.
3. Each call is unpickled, run and answered with a ``Result``. Calls *start* in the
   order they arrived: the client relies on that to know which calls were running
   when a worker dies.
4. ``Shutdown`` is queued behind the calls already received, so they finish first; the
   worker then exits with status 0.
5. End of file on the socket means the parent is gone (or gave up on us): the worker kills
   its whole process group at once, so a task's subprocesses die with it. The parent-death
   signal (Linux) covers the parent dying before the reader notices.
6. On Linux the worker is a child subreaper: the orphans of its tasks' subprocesses (a
   double-forked daemon) become its children instead of init's, so they stay its
   descendants, and the parent finds and kills them with the worker. Their zombies are
   reaped after calls (:meth:`Runtime.reap_orphans`), never one that a ``Popen`` or a
   ``multiprocessing`` process of the task will wait for.

The worker imports nothing from the client side.
"""

from __future__ import annotations

import _signal  # not `signal`: it imports enum, which costs a worker ~2 ms at start-up
import _thread
import os
import sys
from _queue import SimpleQueue

from offload import protocol as p
from offload.errors import ProtocolError
from offload.serde import dumps, loads, type_name

TYPE_CHECKING = False  # a worker imports this at start-up; typing costs milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn


SETTINGS_ENV = "OFFLOAD_WORKER"
INIT_KIND = 2  # Call.kind for the initializer, sent before any user call
# Bytes of an OK Result besides its payload and buffers: tag and numbers (25), three
# empty strings (12), the payload's length (4) and the buffer count (4).
_RESULT_OVERHEAD = 45
# Reads go into one preallocated buffer: allocating a fresh 256 KiB bytes object per
# read costs an mmap/munmap pair, more than the rest of a small call's round trip.
_READ_SIZE = 1 << 18
_STOP = object()

_current = _thread._local()
_clock = __import__("time").perf_counter
_IOV_MAX = 1024  # buffers one writev takes at most (Linux)
_MAX_FUNCTIONS = 1024


def report(value: Any) -> None:
    """Inside a task: publish ``value`` as the progress of the running call.

    The client's ``fut.progress()`` returns the latest value and
    ``fut.add_progress_callback(cb)`` sees every one. Outside a worker this does nothing.
    """
    runtime: Runtime | None = getattr(_current, "runtime", None)
    if runtime is None:
        return
    data, buffers = dumps(value)
    runtime.send(p.Progress(call_id=_current.call_id, payload=data, buffers=tuple(buffers)))


def current_worker_name() -> str | None:
    """The name of this worker process, or None outside a worker."""
    runtime = _runtime
    return runtime.name if runtime is not None else None


_runtime: Runtime | None = None


class Runtime:
    """One worker process's loop: reader thread, executor threads, result sender."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.fd: int = settings["fd"]
        self.name: str = settings.get("name", "offload-worker")
        self.concurrency: int = max(1, int(settings.get("concurrency", 1)))
        self.max_message_size: int = int(settings.get("max_message_size", 1 << 30))
        self.heartbeat: list[float] | None = settings.get("heartbeat")
        self.shutdown_on: str = settings.get("shutdown_on", "parent_exit")
        self.parent_pid: int = int(settings.get("ppid", 0))
        self.conn = p.Connection(
            "worker",
            name=self.name,
            pid=os.getpid(),
            slots=self.concurrency,
            max_message_size=self.max_message_size,
        )
        self.queue: SimpleQueue[Any] = SimpleQueue()
        self._read_buf = bytearray(_READ_SIZE)
        self._read_view = memoryview(self._read_buf)
        self.cancelled: set[int] = set()
        # Functions that calls name by reference (Call.function), looked up once.
        self._functions: dict[bytes, Callable[..., Any]] = {}
        self._send_lock = _thread.allocate_lock()
        self._closed = False
        # Adopted orphans (see reap_orphans): when to look for their zombies next.
        self.subreaper = False
        self._next_reap = 0.0
        self._reap_lock = _thread.allocate_lock()

    # -- output --------------------------------------------------------------------------

    def send(self, msg: p.Message) -> None:
        """Send one message; safe from any thread."""
        with self._send_lock:
            if self._closed:
                return
            self._write(self.conn.send(msg))

    def _write(self, chunks: list[Any]) -> None:
        views = [memoryview(c).cast("B") for c in chunks]
        while views:
            try:
                n = os.writev(self.fd, views[:_IOV_MAX])
            except InterruptedError:
                continue
            except OSError:
                self._closed = True  # parent gone; the reader will notice EOF
                return
            while n and views:
                if n >= views[0].nbytes:
                    n -= views[0].nbytes
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0

    # -- input ---------------------------------------------------------------------------

    @property
    def inline(self) -> bool:
        """Run calls on the thread that reads the socket (no thread hand-off per call).

        Possible when calls run one at a time and nothing must be answered while a call
        runs (no heartbeat): parent death during a call is then caught by the
        parent-death signal, and calls that arrive meanwhile wait in the socket buffer.
        """
        return self.concurrency == 1 and not self.heartbeat

    def read_batch(self, timeout: float | None = None) -> list[p.Message]:
        """Block until at least one frame arrives; return the complete messages.

        Ends the process when the client is gone or breaks the protocol.
        """
        while True:
            if timeout is not None:
                import select

                ready, _, _ = select.select([self.fd], [], [], timeout)
                if not ready:
                    self.die("no heartbeat from the client")
            try:
                n = os.readv(self.fd, [self._read_buf])
            except InterruptedError:
                continue
            except OSError:
                n = 0
            self.conn.receive_data(self._read_view[:n] if n else b"")
            batch: list[p.Message] = []
            try:
                ended = self.conn.next_events(batch) is p.CLOSED
            except ProtocolError:
                self.die("protocol error from the client")
            if ended:
                self.die("the client closed the connection")
            if batch:
                return batch

    def read_loop(self) -> None:
        """Reader thread (threaded mode): route frames to the executors. Never returns."""
        timeout = None
        if self.heartbeat and self.shutdown_on == "heartbeat_timeout":
            timeout = float(self.heartbeat[1])
        while True:
            for msg in self.read_batch(timeout):
                self.dispatch(msg)

    def inline_loop(self) -> None:
        """Inline mode: read and run calls on this thread; returns on Shutdown."""
        while True:
            batch = self.read_batch()
            for msg in batch:  # a Cancel read with its call must win over running it
                if isinstance(msg, p.Cancel):
                    self.cancelled.add(msg.call_id)
            for msg in batch:
                if isinstance(msg, p.Call):
                    if msg.call_id in self.cancelled:
                        self.cancelled.discard(msg.call_id)
                        continue
                    # Each result goes back as soon as it is ready: holding it to share
                    # a write with the next call's would make it wait for that call,
                    # however long it runs.
                    self.send(self.timed_run(msg))
                    if self.subreaper:
                        self.reap_orphans()
                elif isinstance(msg, p.Shutdown):
                    return
                else:
                    self.dispatch(msg)

    def dispatch(self, msg: Any) -> None:
        match msg:
            case p.Call():
                self.queue.put(msg)
            case p.Ping(seq=seq):
                self.send(p.Pong(seq=seq))
            case p.Cancel(call_id=call_id):
                self.cancelled.add(call_id)
            case p.Shutdown():
                for _ in range(self.concurrency):  # one per executor thread, behind the calls
                    self.queue.put(_STOP)
            case p.Goodbye():
                self.die("the client said goodbye")
            case _:
                pass  # Hello (handled by Connection), Pong and channel traffic

    def die(self, why: str) -> NoReturn:
        """The parent is gone: end this worker and everything it started, now."""
        self._closed = True
        try:
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpid(), _signal.SIGKILL)
        finally:
            os._exit(1)

    # -- execution -----------------------------------------------------------------------

    def execute_loop(self) -> None:
        """Executor thread: run queued calls in arrival order until told to stop."""
        while True:
            call = self.queue.get()
            if call is _STOP:
                return
            if call.call_id in self.cancelled:
                self.cancelled.discard(call.call_id)
                continue
            self.send(self.timed_run(call))
            if self.subreaper:
                self.reap_orphans()

    def reap_orphans(self) -> None:
        """Reap the zombies of orphans this worker adopted as a child subreaper.

        Cheap when there is nothing to do: at most one ``waitid`` probe per
        ``_REAP_INTERVAL``. A zombie child is reaped only when nothing in this process
        will wait for it: not a live ``subprocess.Popen`` (nor one ``subprocess`` keeps
        to reap later) and not a ``multiprocessing`` child. A task that forks with
        ``os.fork`` and waits for the child in a later call loses its status; nothing
        else does.
        """
        now = _clock()
        if now < self._next_reap or not self._reap_lock.acquire(False):
            return
        try:
            self._next_reap = now + _REAP_INTERVAL
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except OSError:  # no children at all (ChildProcessError)
                return
            if info is None:
                return
            claimed = _claimed_pids()
            for pid in _zombie_children():
                if pid not in claimed:
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except OSError:
                        pass
            if info.si_pid in claimed:
                # A zombie someone will wait for hides others from the probe: look
                # less often while it lingers (the scan above is not free).
                self._next_reap = now + _REAP_BACKOFF
        finally:
            self._reap_lock.release()

    def timed_run(self, call: p.Call) -> p.Result:
        """:meth:`run`, with the time it took in ``Result.elapsed`` (the client sizes its
        pipelines and map chunks with it)."""
        started = _clock()
        result = self.run(call)
        object.__setattr__(result, "elapsed", _clock() - started)
        return result

    def run(self, call: p.Call) -> p.Result:
        """Run one call and build its Result. Never raises."""
        try:
            if call.kind == p.BY_NAME:
                from offload.tasks import lookup

                task = lookup(call.target)
                if task is None:
                    return p.Result(
                        call_id=call.call_id, status=p.UNKNOWN_TASK, type_name=call.target
                    )
                args, kwargs = loads(call.payload, call.buffers)
                fn: Callable[..., Any] = task
            elif call.function:
                cached = self._functions.get(call.function)
                if cached is None:
                    cached = loads(call.function)
                    if len(self._functions) >= _MAX_FUNCTIONS:
                        self._functions.clear()
                    self._functions[call.function] = cached
                fn = cached
                args, kwargs = loads(call.payload, call.buffers)
            else:
                fn, args, kwargs = loads(call.payload, call.buffers)
        except BaseException as exc:  # noqa: BLE001 - SystemExit in __reduce__ included
            return p.Result(
                call_id=call.call_id,
                status=p.BAD_ARGUMENT,
                type_name=type_name(exc),
                message=f"the call's arguments could not be unpickled in the worker: "
                f"{type_name(exc)}: {exc}",
                traceback=_format(exc),
            )
        _current.runtime = self
        _current.call_id = call.call_id
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - the task's exception, whatever it is
            return self._raised(call.call_id, exc)
        finally:
            _current.runtime = None
            del args, kwargs, fn
            _flush_stdio()
        try:
            data, buffers = dumps(value)
        except BaseException as exc:  # noqa: BLE001
            return p.Result(
                call_id=call.call_id,
                status=p.BAD_RESULT,
                type_name=type_name(value),
                message=f"the result of type {type_name(value)} could not be pickled: "
                f"{type_name(exc)}: {exc}",
                traceback=_format(exc),
            )
        size = len(data) + sum(8 + b.nbytes for b in buffers) if buffers else len(data)
        if size + _RESULT_OVERHEAD > self.max_message_size:
            return p.Result(
                call_id=call.call_id,
                status=p.BAD_RESULT,
                type_name=type_name(value),
                message=f"the result ({type_name(value)}, {size} bytes pickled) exceeds "
                f"max_message_size ({self.max_message_size} bytes)",
            )
        return p.Result(
            call_id=call.call_id,
            status=p.OK,
            payload=data,
            buffers=tuple(buffers) if buffers else (),
        )

    def _raised(self, call_id: int, exc: BaseException) -> p.Result:
        tb = _format(exc, skip=1)
        try:
            data, buffers = dumps(exc)
            loads(data, buffers)  # an exception that cannot be rebuilt travels as text
        except BaseException:  # noqa: BLE001
            data, buffers = b"", []
        return p.Result(
            call_id=call_id,
            status=p.RAISED,
            type_name=type_name(exc),
            message=_safe_str(exc),
            traceback=tb,
            payload=data,
            buffers=tuple(buffers),
        )


_REAP_INTERVAL = 0.1  # seconds between looks for adopted orphans' zombies
_REAP_BACKOFF = 5.0  # ... while a zombie that someone will wait for lingers


def _zombie_children() -> list[int]:
    """Pids of this process's children that have exited and are not reaped (Linux)."""
    zombies = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                pids = f.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(b"/proc/%s/stat" % pid, "rb") as f:
                    state = f.read().rpartition(b")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state == b"Z":
                zombies.append(int(pid))
    return zombies


def _claimed_pids() -> set[int]:
    """Pids of children that a Popen or a multiprocessing process object of this process
    will wait for (so an orphan reaper must leave their zombies alone)."""
    import gc

    classes: list[type] = []
    claimed: set[int] = set()
    subprocess = sys.modules.get("subprocess")
    if subprocess is not None:
        classes.append(subprocess.Popen)
        # Popens dropped unwaited: subprocess reaps them on its next start.
        claimed.update(proc.pid for proc in list(getattr(subprocess, "_active", None) or ()))
    popen_fork = sys.modules.get("multiprocessing.popen_fork")
    if popen_fork is not None:
        classes.append(popen_fork.Popen)  # also the spawn and forkserver ones
    if classes:
        kinds = tuple(classes)
        for obj in gc.get_objects():
            if isinstance(obj, kinds) and getattr(obj, "returncode", None) is None:
                pid = getattr(obj, "pid", None)
                if isinstance(pid, int):
                    claimed.add(pid)
    return claimed


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001
        return f"<unprintable {type_name(exc)}>"


def _format(exc: BaseException, skip: int = 0) -> str:
    import traceback

    tb = exc.__traceback__
    for _ in range(skip):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # noqa: BLE001
        return f"{type_name(exc)}: <traceback unavailable>"


def _flush_stdio() -> None:
    """Flush what the call printed, so it comes out before its result is back."""
    try:
        sys.stdout.flush()
    except (AttributeError, OSError, ValueError):  # None, closed or broken
        pass
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass


def _set_title(name: str) -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


# The parent-death signal. Not SIGTERM: a SIGTERM may come from anyone (and the parent
# is then alive to clean up after us), while this one means the parent is gone, so the
# worker must take its whole process group along itself. The kernel sends it when the
# parent *thread* that forked us exits, which can be a moment before the parent process
# is gone and getppid() changes, so the signal itself must say it.
PARENT_DEATH_SIGNAL = _signal.SIGHUP


_prctl_function: Callable[..., int] | None = None


def _prctl() -> Callable[..., int]:
    """libc's prctl(), through ``_ctypes`` directly: the ``ctypes`` package costs a
    worker about a millisecond more to import, on every start."""
    global _prctl_function
    if _prctl_function is not None:
        return _prctl_function
    import _ctypes

    ct: Any = _ctypes  # the private C half of ctypes; its stubs describe the public one

    class CInt(ct._SimpleCData):  # type: ignore[misc]
        _type_ = "i"

    class Function(ct.CFuncPtr):  # type: ignore[misc]
        _flags_ = ct.FUNCFLAG_CDECL
        _restype_ = CInt

    class Libc:
        _handle = ct.dlopen(None, 2)  # RTLD_NOW, the running program's symbols

    function: Callable[..., int] = Function(("prctl", Libc()))
    _prctl_function = function
    return function


def _become_subreaper() -> bool:
    """Linux: adopt the orphans of our descendants (PR_SET_CHILD_SUBREAPER), so that a
    task's double-forked daemons stay our descendants and die with us when killed."""
    if not sys.platform.startswith("linux"):
        return False
    pr_set_child_subreaper = 36
    try:
        return _prctl()(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    except (OSError, AttributeError, ImportError):
        return False


def _set_parent_death_signal(parent_pid: int) -> None:
    """Linux: have the kernel signal us when the parent dies (backup for the lifeline)."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    try:
        _prctl()(pr_set_pdeathsig, int(PARENT_DEATH_SIGNAL), 0, 0, 0)
    except (OSError, AttributeError, ImportError):
        return
    if parent_pid and os.getppid() != parent_pid:
        os.killpg(os.getpid(), _signal.SIGKILL) if os.getpgrp() == os.getpid() else os._exit(1)


def encode_settings(settings: dict[str, Any]) -> str:
    """Worker settings as an environment-variable value (hex of a pickle: decoding it
    needs nothing the worker does not import anyway)."""
    import _pickle

    return _pickle.dumps(settings, 4).hex()


def decode_settings(text: str) -> dict[str, Any]:
    """The inverse of :func:`encode_settings`."""
    import _pickle

    settings: dict[str, Any] = _pickle.loads(bytes.fromhex(text))
    return settings


def run_worker(settings: dict[str, Any] | None = None) -> NoReturn:
    """Run this process as a worker until told to stop; never returns.

    Args:
        settings: the worker settings; read from ``OFFLOAD_WORKER`` when omitted.
    """
    global _runtime
    if settings is None:
        settings = decode_settings(os.environ.pop(SETTINGS_ENV))
    os.set_inheritable(settings["fd"], False)  # tasks' subprocesses must not hold it
    for entry in reversed(settings.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    import faulthandler

    faulthandler.enable()
    name = settings.get("name", "offload-worker")
    _set_title(name)
    runtime = _runtime = Runtime(settings)
    runtime.subreaper = _become_subreaper()

    def on_parent_death(signum: int, frame: Any) -> None:
        runtime.die("the parent died")  # take the whole process group along

    def on_sigterm(signum: int, frame: Any) -> None:
        if runtime.parent_pid and os.getppid() != runtime.parent_pid:
            runtime.die("the parent died")
        # Someone asked us to stop: die of SIGTERM, so the exit status says so (the
        # parent then kills the rest of the process group).
        _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGTERM)

    _signal.signal(PARENT_DEATH_SIGNAL, on_parent_death)
    _signal.signal(_signal.SIGTERM, on_sigterm)
    if sys.stdout is not None and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    for module in settings.get("preload", []):
        __import__(module)
    runtime._write(runtime.conn.hello())

    if settings.get("shutdown_on", "parent_exit") != "explicit":
        _set_parent_death_signal(runtime.parent_pid)
    if runtime.inline:
        runtime.inline_loop()
    else:
        import threading

        threading.Thread(
            target=runtime.read_loop, name="offload-worker-reader", daemon=True
        ).start()
        helpers = [
            threading.Thread(target=runtime.execute_loop, name=f"offload-exec-{i}", daemon=True)
            for i in range(1, runtime.concurrency)
        ]
        for t in helpers:
            t.start()
        runtime.execute_loop()  # returns on Shutdown
        for t in helpers:
            t.join()
    _flush_stdio()
    with runtime._send_lock:
        runtime._write(runtime.conn.send(p.Goodbye(reason="shutdown")))
        runtime._closed = True
    os._exit(0)
