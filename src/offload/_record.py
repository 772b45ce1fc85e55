"""Records: classes of named fields, declared like dataclasses, made without them.

Theory of operation
-------------------
A fresh program's first pool imports the client side: the scheduler's actions and
state, the slots' call records, the launch spec, the worker options. Declared with
:func:`dataclasses.dataclass`, they would cost that program about a fifth of its
start: :mod:`dataclasses` imports :mod:`inspect` (and with it :mod:`ast` and
:mod:`dis`), and every class it makes runs several ``exec`` calls, then, for
``slots=True``, builds the class a second time. :func:`record` takes the same
declarations (annotated fields, defaults, :func:`field` with a ``default_factory``,
``frozen``, ``slots``, ``kw_only``, a ``__post_init__``) and makes the class without
compiling anything: its ``__init__`` (as fast per instance as a dataclass's) is compiled,
with one ``exec``, when its second instance is made (the first binds its arguments
without it), so the records a program makes once or never cost it no compiling.
``__eq__``, ``__hash__`` (frozen records), ``__repr__`` and ``__reduce__`` are shared
methods that read the field list. mypy checks records as
dataclasses (``dataclass_transform``).

:func:`replace` and :func:`fields` stand in for :func:`dataclasses.replace` and
:func:`dataclasses.fields` (names only). A frozen record refuses assignment with
:class:`FrozenInstanceError`, an :class:`AttributeError`. The public records that the
SPEC calls dataclasses (``PoolStats``, the status values) stay real dataclasses, in
modules that load only when they are first used.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    from typing_extensions import dataclass_transform

    C = TypeVar("C", bound=type)
    R = TypeVar("R")
else:

    def dataclass_transform(**_: object) -> Any:
        return lambda f: f


class FrozenInstanceError(AttributeError):
    """Raised when a field of a frozen record is assigned or deleted."""


class _Factory:
    """A field's ``default_factory`` (what :func:`field` returns)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], R]) -> R:
    """A field whose default is made anew for each record, as
    ``dataclasses.field(default_factory=...)``."""
    return _Factory(default_factory)  # type: ignore[return-value]


@dataclass_transform(field_specifiers=(field,))
def record(
    cls: C | None = None,
    /,
    *,
    frozen: bool = False,
    slots: bool = False,
    kw_only: bool = False,
) -> Any:
    """Make ``cls`` a record of its annotated fields (``@record`` or
    ``@record(frozen=True, slots=True, kw_only=True)``), as :func:`dataclasses.dataclass`
    would with the same arguments.

    Raises:
        TypeError: a field without a default follows one with a default (positional
            fields only, as for dataclasses).
    """

    def make(cls: C) -> C:
        return _make(cls, frozen=frozen, slots=slots, kw_only=kw_only)

    return make if cls is None else make(cls)


def fields(rec: object) -> tuple[str, ...]:
    """The names of a record's (or record class's) fields, in order."""
    names: tuple[str, ...] = getattr(rec, "__record_fields__")  # noqa: B009 - any record
    return names


def replace(rec: R, /, **changes: Any) -> R:
    """A new record of ``rec``'s class with ``changes`` (its ``__post_init__`` runs
    again), as :func:`dataclasses.replace`, which it is for a dataclass (so one
    ``replace`` serves code holding either).

    Raises:
        TypeError: ``changes`` names a field the record does not have.
    """
    if hasattr(type(rec), "__dataclass_fields__"):
        import dataclasses  # loaded already: it made rec's class

        return dataclasses.replace(rec, **changes)  # type: ignore[type-var]
    values = {name: getattr(rec, name) for name in fields(rec)}
    values.update(changes)
    return type(rec)(**values)


# -- making the class ----------------------------------------------------------------------

_MISSING = object()


def _is_classvar(annotation: object) -> bool:
    """Whether a field's annotation (a string under ``from __future__ import
    annotations``, else the object, whose repr is ``typing.ClassVar[...]``) is a
    ``ClassVar``: a class attribute, not a field."""
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar"))


def _make(cls: C, *, frozen: bool, slots: bool, kw_only: bool) -> C:
    inherited: tuple[str, ...] = getattr(cls, "__record_fields__", ())
    defaults: dict[str, object] = dict(getattr(cls, "__record_defaults__", {}))
    keyword: set[str] = set(getattr(cls, "__record_kw_only__", ()))
    own = [
        name
        # This class's own annotations (not inspect.get_annotations: inspect is what
        # records avoid importing).
        for name, annotation in cls.__dict__.get("__annotations__", {}).items()  # noqa: RUF063
        if not _is_classvar(annotation)
    ]
    for name in own:
        value = cls.__dict__.get(name, _MISSING)
        if value is not _MISSING:
            defaults[name] = value
        if kw_only:
            keyword.add(name)
    names = inherited + tuple(n for n in own if n not in inherited)

    # Its own or inherited (found on cls, whose bases the record keeps).
    post_init = getattr(cls, "__post_init__", None)
    methods: dict[str, object] = {
        "__init__": _first_init(
            cls.__qualname__, names, defaults, keyword=keyword, frozen=frozen, post_init=post_init
        ),
        "__repr__": _repr,
        "__eq__": _eq,
        "__reduce__": _reduce,
    }
    if frozen:
        methods.update(__setattr__=_frozen_setattr, __delattr__=_frozen_delattr, __hash__=_hash)
    own_hash = cls.__dict__.get("__hash__")
    # As a dataclass: what the class body defines stays (a __hash__ of None is Python's
    # own, set because the body defines __eq__); mutable records are unhashable.
    own_methods = {n for n in methods if n in cls.__dict__ and n != "__hash__"}
    if own_hash is not None and own_hash is not _hash:
        own_methods.add("__hash__")
    methods.setdefault("__hash__", None)
    attributes: dict[str, object] = {
        "__record_fields__": names,
        "__record_defaults__": defaults,
        "__record_kw_only__": frozenset(keyword),
        "__match_args__": tuple(n for n in names if n not in keyword),
        **{n: m for n, m in methods.items() if n not in own_methods},
    }
    if not slots:
        for name, value in attributes.items():
            setattr(cls, name, value)
        return cls
    # Slots: the class is made again, with __slots__ and without the defaults (a class
    # attribute would hide its slot), as dataclasses do.
    namespace = {**cls.__dict__, **attributes}
    for name in ("__dict__", "__weakref__", *own):
        namespace.pop(name, None)
    namespace["__slots__"] = tuple(n for n in own if n not in inherited)
    made: C = type(cls)(cls.__name__, cls.__bases__, namespace)
    _point_class_cells(cls, made)
    return made


def _point_class_cells(old: type, new: type) -> None:
    """Make the methods' ``__class__`` cells (zero-argument ``super()``) name ``new``."""
    for value in new.__dict__.values():
        function = getattr(value, "__func__", value)  # classmethod, staticmethod
        for cell in getattr(function, "__closure__", None) or ():
            if cell.cell_contents is old:
                cell.cell_contents = new


def _first_init(
    qualname: str,
    names: tuple[str, ...],
    defaults: dict[str, object],
    *,
    keyword: set[str],
    frozen: bool,
    post_init: Callable[[Any], None] | None,
) -> Callable[..., None]:
    """The record's first ``__init__``: it binds the arguments itself (no compiling) for
    the first instance, and compiles the record's own ``__init__`` and puts it in its
    place at the second. Compiling costs a fraction of a millisecond a class; a fresh
    program makes one instance of many records (its options, a launch spec per
    worker), several of only some (those of calls), and none of the rest."""
    positional = tuple(n for n in names if n not in keyword)
    first = True

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal first
        if first:
            first = False
            values = _bind(qualname, names, positional, defaults, args=args, kwargs=kwargs)
            put = object.__setattr__ if frozen else setattr
            for name in names:
                put(self, name, values[name])
            if post_init is not None:
                post_init(self)
            return
        real = _init(qualname, names, defaults, keyword=keyword, frozen=frozen, post_init=post_init)
        for owner in type(self).__mro__:  # the record class (self may be a subclass's)
            if owner.__dict__.get("__init__") is __init__:
                setattr(owner, "__init__", real)  # noqa: B010 - on the class, not self
                break
        real(self, *args, **kwargs)

    __init__.__qualname__ = f"{qualname}.__init__"
    return __init__


def _bind(
    qualname: str,
    names: tuple[str, ...],
    positional: tuple[str, ...],
    defaults: dict[str, object],
    *,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Each field's value for ``__init__(*args, **kwargs)``, as the compiled
    ``__init__`` would bind them.

    Raises:
        TypeError: too many positional arguments, an unknown or repeated keyword, or a
            field without a default and without a value.
    """
    where = f"{qualname}.__init__()"
    if len(args) > len(positional):
        raise TypeError(
            f"{where} takes {len(positional) + 1} positional arguments but "
            f"{len(args) + 1} were given"
        )
    values = dict(zip(positional, args, strict=False))  # the rest: defaults or keywords
    for name, value in kwargs.items():
        if name not in names:
            raise TypeError(f"{where} got an unexpected keyword argument {name!r}")
        if name in values:
            raise TypeError(f"{where} got multiple values for argument {name!r}")
        values[name] = value
    for name in names:
        if name not in values:
            default = defaults.get(name, _MISSING)
            if default is _MISSING:
                raise TypeError(f"{where} missing 1 required argument: {name!r}")
            values[name] = default.make() if isinstance(default, _Factory) else default
    return values


def _init(
    qualname: str,
    names: tuple[str, ...],
    defaults: dict[str, object],
    *,
    keyword: set[str],
    frozen: bool,
    post_init: Callable[[Any], None] | None,
) -> Callable[..., None]:
    """The record's ``__init__``, compiled from source as a dataclass's is."""
    env: dict[str, object] = {
        "_MISSING": _MISSING,
        "_set": object.__setattr__,
        "_post_init": post_init,
    }
    positional, keywords, body = [], [], []
    seen_default = False
    for name in names:
        default = defaults.get(name, _MISSING)
        if isinstance(default, _Factory):
            env[f"_factory_{name}"] = default.make
            param = f"{name}=_MISSING"
            value = f"_factory_{name}() if {name} is _MISSING else {name}"
        elif default is not _MISSING:
            env[f"_default_{name}"] = default
            param = f"{name}=_default_{name}"
            value = name
        else:
            param = name
            value = name
        if name in keyword:
            keywords.append(param)
        else:
            if default is _MISSING and seen_default:
                raise TypeError(f"{qualname}: field {name!r} without a default follows one with")
            seen_default = seen_default or default is not _MISSING
            positional.append(param)
        body.append(f"_set(self, {name!r}, {value})" if frozen else f"self.{name} = {value}")
    params = ["self", *positional] + (["*", *keywords] if keywords else [])
    if post_init is not None:
        body.append("_post_init(self)")
    if not body:
        body.append("pass")
    source = f"def __init__({', '.join(params)}):\n" + "".join(f"    {line}\n" for line in body)
    exec(source, env)  # the source is made above, from field names only
    init: Callable[..., None] = env["__init__"]  # type: ignore[assignment]
    init.__qualname__ = f"{qualname}.__init__"
    return init


def _repr(self: Any) -> str:
    parts = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__record_fields__)
    return f"{type(self).__qualname__}({parts})"


def _eq(self: Any, other: Any) -> bool:
    if type(other) is not type(self):
        return NotImplemented  # type: ignore[no-any-return]
    return all(getattr(self, n) == getattr(other, n) for n in self.__record_fields__)


def _hash(self: Any) -> int:
    return hash(tuple(getattr(self, n) for n in self.__record_fields__))


def _reduce(self: Any) -> tuple[Any, ...]:
    # copy and pickle make a new record through its constructor (the default protocol
    # would set the slots of a frozen one, which __setattr__ refuses).
    return (_remake, (type(self), {n: getattr(self, n) for n in self.__record_fields__}))


def _remake(cls: Callable[..., R], values: dict[str, Any]) -> R:
    return cls(**values)


def _frozen_setattr(self: Any, name: str, value: object) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")
