"""Pickling for calls, results and exceptions (shared by the client and the worker).

* Pickle protocol 5 with out-of-band buffers: ``bytes``-like payloads and NumPy arrays go
  beside the pickle stream instead of being copied into it.
* Module-level functions travel by reference with the fast C pickler. Anything the C
  pickler cannot do, or anything that refers to ``__main__`` (a script's functions and
  classes, which a fresh worker cannot import), is pickled again with cloudpickle, by value.
* Exceptions travel as themselves when they survive pickling; otherwise as a description
  (type name, message, traceback) that the client turns into :class:`RemoteError`.

cloudpickle is imported only when needed, so a worker that only receives
module-level calls never pays for its import.
"""

from __future__ import annotations

import _pickle  # the C pickler without pickle.py's imports (a worker starts faster)
import io

TYPE_CHECKING = False  # imported by workers at start-up
if TYPE_CHECKING:
    from typing import Any

PROTOCOL = 5
_MAIN_MARK = b"__main__"
_SMALL_BUFFER = 1 << 14  # below this, in-band copies are cheaper than extra frame segments
# A stream this long is pickled again with large bytes out of band, wherever they are
# (_wants_out_of_band looks two levels deep only).
_DEEP = 1 << 20
# The first byte of a stream whose large bytes, bytearrays and memoryviews travel out of
# band (see _OutOfBand); a pickle stream of protocol 5 starts with PROTO (0x80).
_OUT_OF_BAND = b"\xff"


def dumps(obj: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj``; return the stream and its out-of-band buffers.

    Raises whatever pickling raises (the caller turns it into SerializationError).
    """
    buffers: list[memoryview] = []

    def keep(buf: _pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < _SMALL_BUFFER:
            return True  # serialise in-band
        buffers.append(view)
        return False

    if _wants_out_of_band(obj):
        return _dumps_out_of_band(obj, buffers, keep)
    try:
        data = _pickle.dumps(obj, PROTOCOL, buffer_callback=keep)
    except Exception:  # noqa: BLE001 - whatever the C pickler refuses, cloudpickle tries
        data = b""
    if not data or _MAIN_MARK in data:
        buffers.clear()
        import cloudpickle

        out = io.BytesIO()
        cloudpickle.Pickler(out, protocol=PROTOCOL, buffer_callback=keep).dump(obj)
        data = out.getvalue()
    if len(data) >= _SMALL_BUFFER and (len(data) >= _DEEP or _wants_out_of_band(obj)):
        # Large bytes deeper than _wants_out_of_band looks went in-band.
        buffers.clear()
        return _dumps_out_of_band(obj, buffers, keep)
    return data, buffers


def _wants_out_of_band(obj: Any) -> bool:
    """Whether ``obj``, a call's ``(args, kwargs)`` or a result, holds a large ``bytes``
    or ``bytearray``, or any ``memoryview``, within two levels: the C pickler writes
    the former in-band (a copy into the stream) and refuses the latter, and pickling
    them out of band right away saves a first pass that copies them for nothing.

    Every call and result pays this look (about 0.5 µs for ``((1, "x"), {})`` on a slow
    virtual machine, against 0.75 µs to pickle it); a large ``bytes`` saves a copy of
    itself into a fresh buffer, about as long as sending it."""
    if type(obj) is tuple:
        for item in obj:
            kind = type(item)
            if kind is tuple:
                for x in item:
                    if type(x) in _BLOBS and _big(x):
                        return True
            elif kind is dict:
                if item:
                    for x in item.values():
                        if type(x) in _BLOBS and _big(x):
                            return True
            elif kind in _BLOBS and _big(item):
                return True
        return False
    return type(obj) in _BLOBS and _big(obj)


_BLOBS = frozenset((bytes, bytearray, memoryview))


def _big(obj: Any) -> bool:
    return type(obj) is memoryview or len(obj) >= _SMALL_BUFFER


def _dumps_out_of_band(obj: Any, buffers: list[Any], keep: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` with its large ``bytes`` and ``bytearray`` objects, and its
    memoryviews, as out-of-band buffers (persistent ids that :func:`loads` resolves),
    with the C pickler, or with cloudpickle when :func:`dumps` would use it.

    The stream is ``_OUT_OF_BAND | count:u32 | pickle``; the buffers are the ``count``
    that the persistent ids name, then those that pickle itself takes in order."""
    own: list[memoryview] = []  # the persistent ids' buffers
    seen: dict[int, tuple[Any, ...]] = {}

    def persistent_id(x: Any) -> tuple[Any, ...] | None:
        kind = type(x)
        if kind is bytes or kind is bytearray:
            if len(x) < _SMALL_BUFFER:
                return None
            pid = seen.get(id(x))
            if pid is None:
                own.append(memoryview(x))
                pid = seen[id(x)] = (kind is bytes, len(own) - 1)
            return pid
        if kind is memoryview:
            flat = x if x.c_contiguous else memoryview(x.tobytes())
            flat = flat.cast("B") if flat.ndim != 1 or flat.format != "B" else flat
            own.append(flat)
            return (None, len(own) - 1, x.format, x.shape, x.readonly)
        return None

    out = io.BytesIO()
    out.write(bytes(5))  # the mark and count, once known
    try:
        pickler = _pickle.Pickler(out, PROTOCOL, buffer_callback=keep)
        pickler.persistent_id = persistent_id  # type: ignore[method-assign]
        pickler.dump(obj)
        failed = _MAIN_MARK in out.getvalue()
    except Exception:  # noqa: BLE001 - whatever the C pickler refuses, cloudpickle tries
        failed = True
    if failed:
        buffers.clear()
        own.clear()
        seen.clear()
        import cloudpickle

        out = io.BytesIO()
        out.write(bytes(5))
        pickler = cloudpickle.Pickler(out, protocol=PROTOCOL, buffer_callback=keep)
        pickler.persistent_id = persistent_id
        pickler.dump(obj)
    out.seek(0)
    out.write(_OUT_OF_BAND + len(own).to_bytes(4, "little"))
    own += buffers
    return out.getvalue(), own


_references: dict[Any, bytes] = {}
_MAX_REFERENCES = 1024


def function_reference(fn: Any) -> bytes:
    """The pickle of ``fn`` if it travels by reference (a builtin, or a function that
    its module names), remembered so that a flood of calls pickles it once; ``b""`` for
    anything else (lambdas, closures, ``__main__`` functions, callable objects), which
    travels by value with each call.

    A by-reference pickle is only a name, so it stays right however often it is reused.
    """
    kind = type(fn)
    if kind is _PY_FUNCTION or (kind is _BUILTIN and type(fn.__self__) is _MODULE):
        data = _references.get(fn)
    else:
        return b""
    if data is not None:
        return data
    qualname = getattr(fn, "__qualname__", "<")
    if "<" in qualname or getattr(fn, "__module__", None) == "__main__":
        return b""  # <lambda>, <locals>: cloudpickle, by value
    try:
        data = _pickle.dumps(fn, PROTOCOL)  # the C pickler only pickles by reference
    except Exception:  # noqa: BLE001 - not importable by name: by value
        return b""
    if _MAIN_MARK in data:
        return b""
    if len(_references) >= _MAX_REFERENCES:
        _references.clear()
    _references[fn] = data
    return data


_PY_FUNCTION = type(function_reference)
_BUILTIN = type(len)  # also the type of a builtin's methods bound to an object
_MODULE = type(_pickle)


def loads(data: bytes | memoryview, buffers: tuple[Any, ...] | list[Any] = ()) -> Any:
    """Unpickle a stream made by :func:`dumps`.

    A ``bytes`` or ``bytearray`` that travelled out of band comes back as a real object
    of its type (a copy of its buffer); a NumPy array may be a view of its buffer.
    """
    if not data or data[0] != 0xFF:
        return _pickle.loads(data, buffers=buffers)
    return _load_out_of_band(data, buffers)


def _load_out_of_band(data: bytes | memoryview, buffers: tuple[Any, ...] | list[Any]) -> Any:
    """:func:`loads` of a stream made by :func:`_dumps_out_of_band`."""
    count = int.from_bytes(data[1:5], "little")
    with memoryview(data) as view, view[5:] as stream:
        return _OutOfBandUnpickler(stream, buffers, count).load()


class _OutOfBandUnpickler(_pickle.Unpickler):
    """Resolves the persistent ids of :func:`_dumps_out_of_band` (a subclass: from
    Python 3.13 on, ``persistent_load`` cannot be set on an instance)."""

    def __init__(self, stream: memoryview, buffers: tuple[Any, ...] | list[Any], count: int):
        super().__init__(io.BytesIO(stream), buffers=buffers[count:])
        self._own = buffers
        self._made: dict[int, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        is_bytes, index = pid[0], pid[1]
        buffers = self._own
        if is_bytes is not None:
            found = self._made.get(index)
            if found is None:
                found = self._made[index] = (bytes if is_bytes else bytearray)(buffers[index])
            return found
        view = memoryview(buffers[index])
        fmt, shape, readonly = pid[2], pid[3], pid[4]
        if fmt != "B" or len(shape) != 1:
            view = view.cast("B").cast(fmt, shape)
        return view.toreadonly() if readonly and not view.readonly else view


def type_name(obj: Any) -> str:
    """``module.QualName`` of ``obj``'s type, for error messages."""
    cls = type(obj)
    module = getattr(cls, "__module__", "") or ""
    qualname = getattr(cls, "__qualname__", cls.__name__)
    return qualname if module == "builtins" else f"{module}.{qualname}"


def culprit(obj: Any, depth: int = 0) -> str:
    """Find the type of the (nested) object that refuses to pickle, for error messages."""
    if depth > 3:
        return type_name(obj)
    items: list[Any] = []
    if isinstance(obj, (tuple, list, set, frozenset)):
        items = list(obj)
    elif isinstance(obj, dict):
        items = list(obj.values())
    for item in items:
        try:
            dumps(item)
        except BaseException:  # noqa: BLE001 - any failure marks the culprit
            return culprit(item, depth + 1)
    return type_name(obj)
