"""Functions that travel by value, pickled once and reused while what they capture is
unchanged.

A lambda, a closure or a function defined in ``__main__`` (a script, a notebook cell)
cannot be imported by name in a worker: cloudpickle pickles it by value, with the
values it captures. Doing that for every call costs more than the rest of a small call's
round trip, twice: cloudpickle is slow to pickle, and the worker rebuilds the function
(its code object, its globals) from scratch each time.

So :func:`function_by_value` remembers the pickle of each such function, and the call
carries it in ``Call.function``, the field that names a module-level function by
reference. The worker keeps what it unpickled there, keyed by those exact bytes (see
``offload.worker.execution``): a later call with the same pickle runs the function it
already has. The server of ``offload serve`` relays the bytes untouched, so the same
holds for remote workers.

What makes this safe is the *snapshot*: before reusing a pickle, the function is
compared with what it was when the pickle was made. The snapshot holds

* its code object (by identity: a function redefined in ``__main__`` has a new one),
* its name, qualified name, docstring, defaults, keyword defaults and ``__dict__``,
* the contents of its closure cells (a captured variable rebound since is a change),
* the current values of the globals its code names (a global rebound since, a helper
  redefined, is a change).

When all of that is plain immutable data (ints, strings, bytes, None, booleans, tuples
of them, modules), the snapshot is that data itself with the type of each value (``1``,
``1.0`` and ``True`` are equal but are not the same capture): most lambdas and
closures. Otherwise values are snapshotted with the fast C pickler (mutating a captured
list or dict in place is a change too); functions among them are snapshotted the same
way, recursively; classes that themselves travel by value (defined in ``__main__`` or in
a function) and code objects are compared by identity. A snapshot that differs from every
remembered one means a fresh cloudpickle; so a closure whose captured values change runs
with the new values, and two lambdas of the same code with different captures are two
functions.

A function whose snapshot is plain data is not even snapshotted again while it holds
the very same objects: its code, names, docstring, defaults, the contents of its
closure cells and the values of the globals it names are compared by identity with
those of its last pickle (immutable values that are the same objects are the same
values), which costs a few identity checks per call (:func:`_unchanged`). Such a pickle
is remembered only once it is known to hold what the snapshot says: unpickled in the
parent and snapshotted again (:func:`_made_of`), since another thread may rebind a
capture between the snapshot and the pickle, and even put the same object back.

What is not seen: the attributes of a class defined in ``__main__`` changed in place
after the first call (the class is compared by identity), and state the function
changes *in the worker* (a global it rebinds, a captured list it appends to): the
worker keeps one copy of the function per distinct pickle, so such changes persist for
later calls in that worker, as a module-level function's module globals do.

A function whose pickle or snapshot exceeds 64 KiB (a closure over a big array: the
snapshot gives up after that much), or whose snapshot cannot be taken, is pickled by
value with every call as before (returns ``b""``).
"""

from __future__ import annotations

import _pickle
import io
import operator
import threading
import types

from offload.serde import PROTOCOL

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any

# Above these sizes a function travels with each call: comparing or caching a large
# snapshot would cost what pickling it costs.
MAX_PICKLE = 1 << 16
MAX_SNAPSHOT = 1 << 16
MAX_REMEMBERED = 512  # distinct (function, captures) pickles remembered

_FUNCTION = types.FunctionType
_CODE = types.CodeType
_MODULE = types.ModuleType
_lock = threading.Lock()
# snapshot bytes -> [(the objects it compares by identity, the function's pickle)]
_remembered: dict[bytes, list[tuple[tuple[Any, ...], bytes]]] = {}
_global_names: dict[_CODE, tuple[str, ...]] = {}  # per code object (and nested ones)


def function_by_value(fn: Any) -> bytes:
    """The cloudpickle of ``fn``, a function that travels by value (lambda, closure,
    ``__main__``), made once per distinct snapshot of what it captures (see the module
    docstring); ``b""`` when it is not worth remembering (not a plain function, too
    large, not snapshottable): it then travels with its arguments.

    Raises:
        Exception: whatever cloudpickle raises for a function it cannot pickle.
    """
    if type(fn) is not _FUNCTION:
        return b""
    recent = _recent.get(fn)
    if recent is not None and _unchanged(fn, recent):
        last: bytes = recent[-1]
        return last
    try:
        snapshot, identities = _snapshot(fn)
    except Exception:  # noqa: BLE001 - too large, or not snapshottable: by value each time
        return b""
    for known, remembered in _remembered.get(snapshot, ()):
        if len(known) == len(identities) and all(map(operator.is_, known, identities)):
            _note_recent(fn, snapshot, identities, remembered)
            return remembered
    import cloudpickle

    data: bytes = cloudpickle.dumps(fn, PROTOCOL)
    if len(data) > MAX_PICKLE:
        data = b""  # remembered too: it travels with its arguments, unpickled once
    elif type(snapshot) is tuple and not _made_of(data, snapshot):
        return data  # another thread changed a capture meanwhile: remember nothing
    with _lock:
        if len(_remembered) >= MAX_REMEMBERED:
            _remembered.clear()
        _remembered.setdefault(snapshot, []).append((identities, data))
    _note_recent(fn, snapshot, identities, data)
    return data


def _made_of(data: bytes, snapshot: Any) -> bool:
    """Whether ``data``, a function's fresh pickle, holds what its plain ``snapshot``
    says (read before the pickle was made): not so if another thread rebound a capture
    in between, even to put the same object back. Unpickled here to tell: plain
    captures run no code of the program's to unpickle."""
    import cloudpickle

    try:
        copy = cloudpickle.loads(data)
        return type(copy) is _FUNCTION and _snapshot(copy)[0] == snapshot
    except Exception:  # noqa: BLE001 - anything odd: not remembered, pickled again
        return False


# The last pickle of each function whose captures are plain immutable data, with those
# very objects: while the function still holds the same objects (compared by identity,
# which for immutable values means the same values), its pickle is the same, and the
# snapshot need not be made again. A flood of calls of one lambda then costs a few
# identity checks per call instead of a snapshot and a lookup.
_recent: dict[types.FunctionType, tuple[Any, ...]] = {}
_MISSING = ("<not a global>",)


def _note_recent(
    fn: types.FunctionType, snapshot: Any, identities: tuple[Any, ...], data: bytes
) -> None:
    """Remember ``data`` as ``fn``'s pickle while it holds the objects of ``snapshot``,
    if that is a snapshot of the plain kind (see :func:`_snapshot`); ``data`` is the
    pickle of exactly those (checked by :func:`_made_of`, or remembered for an equal
    snapshot)."""
    if type(snapshot) is not tuple:
        _recent.pop(fn, None)  # captures that can change in place: every call snapshots
        return
    (name, qualname, doc, defaults, kwdefaults, _, cells, used), _kinds = snapshot
    code = identities[0]
    names = _global_names.get(code)
    if names is None:  # forgotten meanwhile (another thread's snapshots filled the table)
        names = _names_of(code)
    present = dict(used)
    values = tuple([present.get(global_name, _MISSING) for global_name in names])
    entry = (code, name, qualname, doc, defaults, kwdefaults, cells, names, values, data)
    if len(_recent) >= MAX_REMEMBERED:
        _recent.clear()
    _recent[fn] = entry


def _unchanged(fn: types.FunctionType, entry: tuple[Any, ...]) -> bool:
    """Whether ``fn`` still holds the very objects ``entry`` noted (see _note_recent)."""
    code, name, qualname, doc, defaults, kwdefaults, cells, names, values, _ = entry
    if (
        fn.__code__ is not code
        or fn.__name__ is not name
        or fn.__qualname__ is not qualname
        or fn.__doc__ is not doc
        or fn.__defaults__ is not defaults
        or fn.__kwdefaults__ is not kwdefaults
        or fn.__dict__
    ):
        return False
    closure = fn.__closure__
    if closure:
        for cell, value in zip(closure, cells, strict=True):
            if _cell_contents(cell) is not value:
                return False
    if names:
        get = fn.__globals__.get
        for global_name, value in zip(names, values, strict=True):
            if get(global_name, _MISSING) is not value:
                return False
    return True


def _snapshot(fn: types.FunctionType) -> tuple[Any, tuple[Any, ...]]:
    """The snapshot of ``fn`` and the objects it compares by identity (kept alive with
    the pickle they stand for, so their ids stay theirs).

    What most lambdas and closures capture is plain immutable data (ints, strings,
    bytes, None, tuples of them, modules): then the snapshot is that data itself, with
    the type of each value (``1``, ``1.0`` and ``True`` are equal, but not the same
    capture). Anything else is snapshotted with the C pickler.
    """
    captures = _captures(fn)
    kinds: list[type] = []
    if _plain(captures, kinds):
        return (captures, tuple(kinds)), (fn.__code__,)
    reused: tuple[_Snapshotter, _Bounded] | None = getattr(_spare, "pickler", None)
    if reused is None:
        out = _Bounded()
        pickler = _Snapshotter(out, PROTOCOL)
    else:
        _spare.pickler = None  # in use (a __reduce__ that submits a call makes its own)
        pickler, out = reused
        out.seek(0)
        out.truncate()
        pickler.clear_memo()
        pickler.identities = []
    pickler.dump(fn)
    _spare.pickler = (pickler, out)  # a pickler costs more to make than a small dump
    return out.getvalue(), tuple(pickler.identities)


_spare = threading.local()  # .pickler: a _Snapshotter and its buffer, free to reuse


class _Bounded(io.BytesIO):
    """Where a snapshot is written: it gives up beyond :data:`MAX_SNAPSHOT` bytes, so a
    closure over a large object costs a bounded part of pickling it before it travels
    with its arguments (the C pickler writes a small pickle in one go, a large one in
    frames of about 64 KiB and large buffers on their own)."""

    def write(self, data: Any) -> int:
        if self.tell() + memoryview(data).nbytes > MAX_SNAPSHOT:
            raise _TooLarge
        return super().write(data)


class _TooLarge(Exception):
    """A snapshot beyond MAX_SNAPSHOT bytes (see _Bounded)."""


_PLAIN = frozenset({int, str, bytes, type(None), bool, _MODULE})


def _plain(value: Any, kinds: list[type]) -> bool:
    """Whether ``value`` is plain immutable data (see :func:`_snapshot`); the type of
    each value goes to ``kinds``, in an order fixed by the shape of ``value``."""
    stack = [value]
    pop, push, note = stack.pop, stack.extend, kinds.append
    while stack:
        item = pop()
        kind = type(item)
        note(kind)
        if kind is tuple:
            push(item)
        elif kind not in _PLAIN:
            return False
    return True


class _Snapshotter(_pickle.Pickler):
    """A C pickler that writes what a by-value function captures, not how to rebuild it.

    ``reducer_override`` is asked about every object but plain data (ints, strings,
    lists, dicts...), which the C pickler writes by value as fast as it can.
    """

    def __init__(self, out: io.BytesIO, protocol: int) -> None:
        super().__init__(out, protocol)
        self.identities: list[Any] = []

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is _FUNCTION:
            if not _travels_by_value(obj):
                return NotImplemented  # importable: its name pins it
            # The state part is written after the function is memoized: a function that
            # names itself (recursion) refers back to it instead of recursing forever.
            return _identity, (self._token(obj.__code__),), _captures(obj)
        if kind is _MODULE:
            return _identity, (obj.__name__,)  # modules travel by name
        if kind is _CODE or (isinstance(obj, type) and _travels_by_value(obj)):
            return _identity, (self._token(obj),)
        return NotImplemented

    def _token(self, obj: Any) -> int:
        self.identities.append(obj)
        return len(self.identities) - 1


def _identity(*_: Any) -> None:
    """Never called: it only names snapshot entries (snapshots are never unpickled)."""


def _travels_by_value(obj: Any) -> bool:
    """Whether cloudpickle pickles ``obj`` (a function or class) by value."""
    return obj.__module__ == "__main__" or "<" in obj.__qualname__


def _captures(fn: types.FunctionType) -> tuple[Any, ...]:
    """What ``fn`` runs with besides its code."""
    closure = fn.__closure__
    cells: tuple[Any, ...] = ()
    if closure:
        cells = tuple(_cell_contents(cell) for cell in closure)
    fn_globals = fn.__globals__
    names = _global_names.get(fn.__code__)
    if names is None:
        names = _names_of(fn.__code__)
        if len(_global_names) >= MAX_REMEMBERED:
            _global_names.clear()
        _global_names[fn.__code__] = names
    used = tuple([(name, fn_globals[name]) for name in names if name in fn_globals])
    return (
        fn.__name__,
        fn.__qualname__,
        fn.__doc__,
        fn.__defaults__,
        fn.__kwdefaults__,
        fn.__dict__ or None,
        cells,
        used,
    )


_EMPTY_CELL = ("<empty cell>",)


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a variable not assigned yet
        return _EMPTY_CELL


def _names_of(code: types.CodeType) -> tuple[str, ...]:
    """Every name ``code`` and the code nested in it look up (globals among them)."""
    names = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if isinstance(const, _CODE):
            names.update(dict.fromkeys(_names_of(const)))
    return tuple(names)
