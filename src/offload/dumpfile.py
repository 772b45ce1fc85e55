"""Crash dumps: the file a call that crashed its worker is saved in, to be replayed.

Theory of operation
-------------------
With ``OFFLOAD_DUMP_DIR`` set, the process that saw a worker crash under a call (the
caller; a worker server for the calls it relays) writes the call to a new file in that
directory (:mod:`offload.client.dumps` builds it, :func:`write` writes it) and
``offload replay FILE`` (:mod:`offload.replay`) runs it again, in the current process or
in a fresh worker.

The call is kept exactly as it travelled: the pickled bytes that were sent, never
unpickled on the way into the file, so the dump replays the very call that crashed (and
writing it cannot run the user's code, or fail on an argument that will not pickle
twice). Format version 1::

    offload-crash-dump 1\\n          the magic line (``head -2 FILE`` shows the header)
    {JSON header}\\n                 one line: see below
    blob | blob | ...               the bytes the header's "blobs" list sizes, in order

The header (a JSON object) holds:

* ``format`` (1), ``created`` (UTC, ISO 8601), ``offload_version``, ``python_version``,
  ``platform``, ``pid`` (the process that wrote it), ``sys_path`` (its ``sys.path``, which
  its workers got too);
* ``call``: ``id``, ``kind`` (``"by_name"``: a registered task's name; ``"function"``:
  the callable pickled on its own, in the ``function`` blob; ``"inline"``: pickled with
  its arguments), ``target`` (the task name, or the function's qualified name),
  ``description`` (``resize('a.png', 100)``), ``timeout``;
* ``worker``: ``name``, ``pid``, ``exitcode``, ``signal``, ``reason`` (the
  :class:`~offload.WorkerCrashed` fields) and ``remote`` (a worker server's worker);
* ``error``: ``type`` and ``message`` (the error the call's future failed with) and
  ``stderr_tail`` (the crash report: what the worker last wrote to stderr);
* ``options``: the worker options that matter to reproduce the crash: ``start_method``,
  ``python``, ``env`` (the variables added to the caller's), ``cwd``, ``umask``,
  ``preload``, ``concurrency``, ``max_message_size``, ``where`` (as text), and
  ``initializer`` (its qualified name, or None);
* ``blobs``: ``[name, size]`` pairs: ``function`` (a function sent by reference, pickled),
  ``payload`` (the pickle: ``(fn, args, kwargs)`` inline, ``(args, kwargs)`` otherwise),
  ``buffer`` (each out-of-band buffer of that pickle, in order) and ``initializer``
  (``(initializer, initargs, {})`` pickled, when there is one and it pickles).

A file is written atomically (to a hidden temporary name in the directory, then renamed)
with mode 0600: it holds the call's arguments and the ``env`` option, which may be
secrets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from offload.tokens import write_private_file

MAGIC = b"offload-crash-dump"
FORMAT = 1
DUMP_DIR_ENV = "OFFLOAD_DUMP_DIR"
SUFFIX = ".offload-dump"
# The header is one line of JSON; bound what a reader takes for it (a dump written by
# offload has a header of a few KiB: the stderr tail is at most 64 KiB of text).
_MAX_HEADER = 1 << 22


@dataclass
class Dump:
    """A crash dump, as read from (or to be written to) a file.

    Attributes:
        header: the JSON header (see the module documentation).
        blobs: the named byte strings, in file order (``buffer`` appears once per
            out-of-band buffer).
    """

    header: dict[str, Any]
    blobs: list[tuple[str, bytes]] = field(default_factory=list)

    def blob(self, name: str) -> bytes:
        """The first blob called ``name`` (``b""`` if there is none)."""
        for key, data in self.blobs:
            if key == name:
                return data
        return b""

    def buffers(self) -> tuple[bytes, ...]:
        """The out-of-band buffers of the payload, in order."""
        return tuple(data for key, data in self.blobs if key == "buffer")


def write(directory: str, stem: str, dump: Dump) -> str:
    """Write ``dump`` to a new file ``<stem><SUFFIX>`` in ``directory`` (made, 0700, if
    missing), atomically and with mode 0600; return its path.

    Raises:
        OSError: the directory cannot be made or written to.
        TypeError, ValueError: the header does not encode as JSON.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    header = dict(dump.header)
    header["blobs"] = [[name, len(data)] for name, data in dump.blobs]
    head = MAGIC + b" %d\n" % FORMAT + json.dumps(header, sort_keys=True).encode() + b"\n"
    path = os.path.join(directory, stem + SUFFIX)
    write_private_file(path, [head, *(data for _, data in dump.blobs)])
    return path


def read(path: str) -> Dump:
    """Read a crash dump.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not an offload crash dump, or one of a format this version
            does not know, or it is truncated.
    """
    with open(path, "rb") as f:
        magic = f.readline(64)
        parts = magic.split()
        if len(parts) != 2 or parts[0] != MAGIC:
            raise ValueError(f"{path} is not an offload crash dump")
        if parts[1] != str(FORMAT).encode():
            raise ValueError(
                f"{path} is a crash dump of format {parts[1].decode(errors='replace')}; "
                f"this offload reads format {FORMAT}"
            )
        line = f.readline(_MAX_HEADER)
        try:
            header = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}: the header of the crash dump is damaged: {exc}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: the header of the crash dump is not an object")
        blobs: list[tuple[str, bytes]] = []
        for name, size in header.get("blobs", []):
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: the crash dump is truncated (in its {name} blob)")
            blobs.append((str(name), data))
    return Dump(header, blobs)
