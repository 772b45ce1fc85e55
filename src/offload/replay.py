"""``offload replay FILE``: run a call saved in a crash dump again (see
:mod:`offload.dumpfile` for how calls come to be saved, with ``OFFLOAD_DUMP_DIR``).

Two ways, for two questions:

* :func:`replay_here` ("what does it do?"): the call runs in this process, on the main
  thread, after doing what its worker did at start-up (its ``sys.path``, ``env``,
  ``cwd``, ``umask``, ``preload`` and initializer). Nothing is caught: an exception
  propagates (``python -m pdb -m offload replay FILE`` stops there, post mortem), a
  segfault kills this process (``gdb --args python -m offload replay FILE`` shows it),
  and faulthandler prints the Python stack of a fatal signal first.
* :func:`replay_in_worker` ("does it still crash?"): the call's pickled bytes, as they
  were sent, go to a fresh worker started with the dumped options (never unpickled
  here), and the outcome is printed: the value, the task's exception, or the typed error,
  e.g. ``WorkerCrashed: worker replay (pid 4121) was killed by SIGSEGV while ...``.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from offload import dumpfile


def _note(text: str) -> None:
    print(f"offload replay: {text}", file=sys.stderr, flush=True)


def describe(dump: dumpfile.Dump) -> str:
    """One sentence on what the dump holds: the call, and how its worker ended."""
    call = dump.header.get("call", {})
    worker = dump.header.get("worker", {})
    error = dump.header.get("error", {})
    what = call.get("description") or call.get("target") or "the call"
    if not worker:
        return f"{what} (a dump that says nothing of a crash)"
    how = worker.get("signal") or (
        f"exit status {worker.get('exitcode')}"
        if worker.get("exitcode") is not None
        else worker.get("reason")
    )
    return (
        f"{what} crashed worker {worker.get('name')} (pid {worker.get('pid')}, {how}; "
        f"{error.get('type')}) on {dump.header.get('created')}"
    )


def _check_python(dump: dumpfile.Dump) -> None:
    dumped = str(dump.header.get("python_version", ""))
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if dumped and ".".join(dumped.split(".")[:2]) != here:
        _note(
            f"the call was pickled by Python {dumped}, this is Python {here}: it may not "
            "unpickle the same (replay it with the Python of the dump)"
        )


def _prepare(dump: dumpfile.Dump) -> None:
    """Make this process look like the worker did at start-up."""
    header = dump.header
    options = header.get("options", {})
    for entry in reversed(header.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    os.environ.update(options.get("env") or {})
    if options.get("cwd"):
        os.chdir(options["cwd"])
    if options.get("umask") is not None:
        os.umask(options["umask"])
    for module in options.get("preload") or ():
        __import__(module)
    initializer = dump.blob("initializer")
    if initializer:
        from offload.serde import loads

        init_buffers = tuple(bytearray(d) for k, d in dump.blobs if k == "initializer_buffer")
        fn, args, kwargs = loads(initializer, init_buffers)
        _note(f"running the initializer {options.get('initializer')}")
        fn(*args, **kwargs)
    elif options.get("initializer"):
        _note(f"the initializer {options['initializer']} could not be saved: running without it")


def decode_call(dump: dumpfile.Dump) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """The callable and arguments of the dumped call, unpickled as a worker does.

    Raises:
        LookupError: a call by name of a task that no module imported here registers.
        Exception: whatever unpickling the call raises.
    """
    from offload.serde import loads

    call = dump.header.get("call", {})
    buffers = tuple(bytearray(data) for data in dump.buffers())  # writable, like a worker's
    payload = dump.blob("payload")
    if call.get("kind") == "by_name":
        from offload.tasks import lookup

        task = lookup(call["target"])
        if task is None:
            raise LookupError(
                f"no task named {call['target']!r} is registered in this process: its "
                "worker imported the module that registers it (preload=...); import it "
                "here too (e.g. PYTHONPATH, or python -c 'import mod; ...')"
            )
        args, kwargs = loads(payload, buffers)
        return task, tuple(args), dict(kwargs)
    function = dump.blob("function")
    if function:
        fn = loads(function)
        args, kwargs = loads(payload, buffers)
    else:
        fn, args, kwargs = loads(payload, buffers)
    return fn, tuple(args), dict(kwargs)


def replay_here(dump: dumpfile.Dump) -> int:
    """Run the call saved in ``dump`` in this process, on this thread; print its value.

    Returns:
        0 once the call returned.

    Raises:
        BaseException: whatever the call (or unpickling it, or its initializer) raises,
            as itself: under ``python -m pdb`` the debugger stops there.
    """
    _note(describe(dump))
    _check_python(dump)
    tail = dump.header.get("error", {}).get("stderr_tail", "")
    if tail:
        _note("its worker's last stderr:\n" + tail.rstrip())
    _prepare(dump)
    fn, args, kwargs = decode_call(dump)
    import faulthandler

    if not faulthandler.is_enabled():
        faulthandler.enable()  # a fatal signal prints the Python stack, then kills us
    _note(f"running it in this process (pid {os.getpid()})")
    value = fn(*args, **kwargs)
    _note("it returned")
    print(repr(value), flush=True)
    return 0


class _Outcome:
    """Where the fresh worker's answer goes (a RawSink): the Result message as the
    worker sent it, or the error the call failed with."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None

    def call_done(self, call_id: int, outcome: Any, *, flush: bool = True) -> None:
        self.value = outcome
        self.done.set()

    def flush(self) -> None:
        pass

    def call_progress(self, msg: Any) -> None:
        pass

    def call_channel(self, msg: Any) -> None:
        pass  # a dumped call's channel ends do not come back with it

    def call_output(self, call_id: int, stream: int, data: bytes) -> None:
        pass  # a local worker's output goes to this terminal directly


def worker_options(dump: dumpfile.Dump, start_method: str | None = None) -> dict[str, Any]:
    """The options of a fresh worker like the one that crashed (``start_method``
    overrides the dumped one; ``reexec`` becomes ``spawn``: the program that re-ran
    itself is not this one)."""
    options = dump.header.get("options", {})
    method = start_method or options.get("start_method") or "spawn"
    if method == "reexec":
        _note("the worker was started with start_method='reexec'; replaying with 'spawn'")
        method = "spawn"
    kwargs: dict[str, Any] = {
        "name": "offload-replay",
        "start_method": method,
        "env": options.get("env") or None,
        "cwd": options.get("cwd"),
        "umask": options.get("umask"),
        "preload": tuple(options.get("preload") or ()),
        "max_message_size": options.get("max_message_size") or (1 << 30),
    }
    python = options.get("python")
    if python and os.path.exists(python):
        kwargs["python"] = python
    initializer = dump.blob("initializer")
    if initializer:
        from offload.serde import loads

        init_buffers = tuple(bytearray(d) for k, d in dump.blobs if k == "initializer_buffer")
        try:
            fn, args, _ = loads(initializer, init_buffers)
            kwargs["initializer"], kwargs["initargs"] = fn, tuple(args)
        except Exception as exc:  # noqa: BLE001 - replay without it, and say so
            _note(f"the initializer could not be unpickled here ({exc!r}): running without it")
    if options.get("where"):
        _note(f"the call crashed a worker of {options['where']}; replaying it in a local one")
    return kwargs


def replay_in_worker(dump: dumpfile.Dump, start_method: str | None = None) -> int:
    """Send the call saved in ``dump`` to a fresh worker, as it was pickled; print the
    outcome (the value; else the task's exception or offload's typed error).

    Returns:
        0 if the call returned a value, 1 otherwise.

    Raises:
        OffloadError: the worker could not start (StartError).
        ValueError, TypeError: ``start_method`` or a dumped option is not valid here.
    """
    from offload import protocol as p
    from offload.client.options import make_options
    from offload.client.outcome import result_error
    from offload.client.worker import Worker
    from offload.serde import loads

    _note(describe(dump))
    _check_python(dump)
    for entry in reversed(dump.header.get("sys_path", [])):
        if entry not in sys.path:  # the worker gets this process's sys.path
            sys.path.insert(0, entry)
    worker = Worker(make_options(**worker_options(dump, start_method)))
    try:
        engine = worker._engine
        _note(f"running it in a fresh worker (pid {worker.pid})")
        call = dump.header.get("call", {})
        kind = p.BY_NAME if call.get("kind") == "by_name" else p.BY_VALUE
        sink = _Outcome()
        message = p.Call(
            call_id=0,
            kind=kind,
            timeout=float(call.get("timeout") or 0.0),
            target=str(call.get("target", "")),
            function=dump.blob("function"),
            payload=dump.blob("payload"),
            buffers=dump.buffers(),
        )
        engine.submit_raw(engine.new_call_id(), message, sink)
        sink.done.wait()
    finally:
        worker.shutdown(wait=True, timeout=5)
    answer = sink.value
    if isinstance(answer, p.Result) and answer.status == p.OK:
        print(repr(loads(answer.payload, answer.buffers)), flush=True)
        return 0
    if isinstance(answer, p.Result) and answer.status == p.RAISED:
        print(answer.traceback.rstrip() or f"{answer.type_name}: {answer.message}", flush=True)
        return 1
    if isinstance(answer, p.Result):
        answer = result_error(answer, call=str(call.get("target")), worker="replay", pid=None)
    print(f"{type(answer).__name__}: {answer}", flush=True)
    return 1
