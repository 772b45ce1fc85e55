"""offload._record: records behave as the dataclasses they replace on the client's path."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections import deque
from typing import Any, ClassVar

import pytest

from offload._record import FrozenInstanceError, field, fields, record, replace


@record(frozen=True, slots=True)
class Point:
    x: int
    y: int = 0
    kind: ClassVar[str] = "point"


@record(slots=True)
class Queue:
    name: str
    items: deque[int] = field(default_factory=deque)


@record(slots=True, kw_only=True)
class Options:
    size: int
    label: str = ""


@record(frozen=True)
class Base:
    n: int = 0

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must be >= 0")
        object.__setattr__(self, "n", int(self.n))


@record(frozen=True, slots=True)
class Derived(Base):
    m: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()  # zero-argument super() in a class made again (slots)
        if self.m < 0:
            raise ValueError("m must be >= 0")


def test_fields_defaults_eq_repr_hash_and_match() -> None:
    for _ in range(3):  # the first instance is bound without the compiled __init__
        p = Point(1)
        assert (p.x, p.y) == (1, 0)
        assert p == Point(1, 0) == Point(x=1)
        assert p != Point(2)
        assert repr(p) == "Point(x=1, y=0)"
        assert hash(p) == hash(Point(1, 0))
    assert Point.kind == "point"  # a ClassVar is no field
    assert fields(Point) == ("x", "y")
    match Point(3, 4):
        case Point(x, y):
            assert (x, y) == (3, 4)
        case _:
            pytest.fail("no match")


def test_frozen_records_refuse_assignment_and_deletion() -> None:
    p = Point(1)
    with pytest.raises(FrozenInstanceError):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.y
    with pytest.raises(AttributeError):
        p.z = 3  # type: ignore[attr-defined]  # slots: no other attribute


def test_mutable_records_take_a_fresh_default_each_and_are_unhashable() -> None:
    a, b = Queue("a"), Queue("b")
    a.items.append(1)
    assert list(b.items) == []
    a.name = "renamed"
    assert a == Queue("renamed", deque([1]))
    with pytest.raises(TypeError, match="unhashable"):
        hash(a)
    assert not hasattr(a, "__dict__")


def test_keyword_only_records() -> None:
    for _ in range(2):
        assert Options(size=1) == Options(size=1, label="")
        with pytest.raises(TypeError):
            Options(1)  # type: ignore[call-arg]
    assert Options.__match_args__ == ()


def _pair_class() -> Any:
    @record(frozen=True, slots=True)
    class Pair:
        a: int
        b: int = 2

    return Pair


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1, 2, 3), {}), ((1,), {"c": 3}), ((1,), {"a": 1})],
    ids=["missing", "too-many", "unknown", "repeated"],
)
def test_bad_arguments_raise_type_error(
    compiled: bool, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    pair = _pair_class()  # a fresh class: its first instance is bound without compiling
    if compiled:
        pair(1)  # from the second instance on, the compiled __init__ binds
    with pytest.raises(TypeError):
        pair(*args, **kwargs)


def test_post_init_runs_inherited_and_again_on_replace() -> None:
    for _ in range(2):
        d = Derived(2, 3)
        assert (d.n, d.m) == (2, 3)
        with pytest.raises(ValueError, match="n must"):
            Derived(-1)
        with pytest.raises(ValueError, match="m must"):
            Derived(0, -1)
    assert fields(Derived) == ("n", "m")
    assert replace(d, m=5) == Derived(2, 5)
    with pytest.raises(ValueError, match="m must"):
        replace(d, m=-1)
    with pytest.raises(TypeError):
        replace(d, nope=1)


def test_replace_also_takes_a_dataclass() -> None:
    @dataclasses.dataclass(frozen=True)
    class Real:
        a: int
        b: int = 0

    assert replace(Real(1), b=2) == Real(1, 2)


def test_records_pickle_and_copy() -> None:
    for value in (Point(1, 2), Derived(1, 2), Options(size=3, label="x")):
        assert pickle.loads(pickle.dumps(value)) == value
        assert copy.copy(value) == value
        assert copy.deepcopy(value) == value
