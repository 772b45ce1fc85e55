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
    return data, buffers


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
    """Unpickle a stream made by :func:`dumps`."""
    return _pickle.loads(data, buffers=buffers)


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
