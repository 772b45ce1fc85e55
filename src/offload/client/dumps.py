"""Saving a call that crashed its worker, for ``offload replay`` (``OFFLOAD_DUMP_DIR``).

The engine calls :func:`save_crashed_call` just before it fails a call's future with a
:class:`~offload.WorkerCrashed` (the worker died under it, stopped answering, went over
memory, or, for a worker server's worker, the server reported that crash), when
``OFFLOAD_DUMP_DIR`` is set. The call's record still holds the pickled bytes that were
sent, so the dump is those bytes, as they travelled (the format is
:mod:`offload.dumpfile`'s).

Saving never gets in the way of the future: whatever fails here is logged and
swallowed, and the future fails with its error all the same.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

from offload import dumpfile
from offload import protocol as p
from offload._version import __version__

if TYPE_CHECKING:
    from offload.client.options import WorkerOptions
    from offload.client.slot import CallRecord

log = logging.getLogger("offload")


def dump_dir() -> str | None:
    """Where crashed calls are saved (``OFFLOAD_DUMP_DIR``), or None: not saved."""
    return os.environ.get(dumpfile.DUMP_DIR_ENV) or None


def save_crashed_call(
    record: CallRecord,
    error: BaseException,
    options: WorkerOptions,
    description: str,
    *,
    where: str | None = None,
) -> str | None:
    """Save the call of ``record``, which failed with ``error`` (a WorkerCrashed), to a
    new file in ``OFFLOAD_DUMP_DIR``; return its path (None when not set, or when saving
    failed: that is logged). Never raises.

    ``description`` is the call as error messages show it (``resize('a.png', 100)``);
    ``where`` the worker server it ran on (None: a local worker).
    """
    directory = dump_dir()
    if directory is None:
        return None
    try:
        dump = _dump_of(record, error, options, description, where)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = dumpfile.write(directory, f"crash-{stamp}-{os.getpid()}-{record.call_id}", dump)
    except Exception as exc:  # noqa: BLE001 - a dump must never stop the future resolving
        log.warning(
            "offload: could not save the call %s that crashed its worker to %s: %s: %s",
            description,
            directory,
            type(exc).__name__,
            exc,
        )
        return None
    log.warning(
        "offload: saved the call %s that crashed its worker to %s (replay it with: "
        "offload replay %s)",
        description,
        path,
        path,
    )
    return path


def _kind(record: CallRecord) -> str:
    if record.kind == p.BY_NAME:
        return "by_name"
    return "function" if record.function else "inline"


def _dump_of(
    record: CallRecord,
    error: BaseException,
    options: WorkerOptions,
    description: str,
    where: str | None,
) -> dumpfile.Dump:
    if where is None and options.where is not None:
        where = str(options.where)
    blobs: list[tuple[str, bytes]] = []
    if record.function:
        blobs.append(("function", bytes(record.function)))
    blobs.append(("payload", bytes(record.payload)))
    blobs.extend(("buffer", bytes(buf)) for buf in record.buffers)
    initializer = options.initializer
    if initializer is not None:
        blobs.extend(_initializer_blobs(initializer, options.initargs))
    header: dict[str, Any] = {
        "format": dumpfile.FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "offload_version": __version__,
        "python_version": platform.python_version(),
        "platform": sys.platform,
        "pid": os.getpid(),
        # Absolute: a replay may run from another directory.
        "sys_path": [os.path.abspath(e) for e in sys.path if isinstance(e, str) and e],
        "call": {
            "id": record.call_id,
            "kind": _kind(record),
            "target": record.target,
            "description": description,
            "timeout": record.timeout,
        },
        "worker": {
            "name": getattr(error, "worker", ""),
            "pid": getattr(error, "pid", None),
            "exitcode": getattr(error, "exitcode", None),
            "signal": getattr(error, "signal", None),
            "reason": getattr(error, "reason", None),
            "remote": where is not None,
        },
        "error": {
            "type": type(error).__name__,
            "message": str(error),
            "stderr_tail": getattr(error, "stderr_tail", ""),
        },
        "options": {
            "start_method": options.start_method,
            "python": options.python,
            "env": dict(options.env or {}),
            "cwd": options.cwd,
            "umask": options.umask,
            "preload": list(options.preload),
            "concurrency": options.concurrency,
            "max_message_size": options.max_message_size,
            "where": where,
            "initializer": None
            if initializer is None
            else getattr(initializer, "__qualname__", repr(initializer)),
        },
    }
    return dumpfile.Dump(header, blobs)


def _initializer_blobs(initializer: Any, initargs: tuple[Any, ...]) -> list[tuple[str, bytes]]:
    """The initializer as a worker gets it (``(initializer, initargs, {})`` pickled), or
    nothing when it does not pickle (the replay then says it runs without it)."""
    from offload.serde import dumps

    try:
        data, buffers = dumps((initializer, initargs, {}))
    except Exception:  # noqa: BLE001 - the call is worth saving without it
        return []
    return [("initializer", data)] + [("initializer_buffer", bytes(b)) for b in buffers]
