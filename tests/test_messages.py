"""Unit tests for the protocol's messages as records: frozen, slotted, keyword-built,
compared by value; and for the wire constants and the protocol package's imports.

Their encoding and the connection are tested in ``test_protocol.py``. No I/O here.
"""

from __future__ import annotations

import ast
import copy
import inspect
import pickle
from pathlib import Path
from typing import Any

import pytest

from offload import protocol as p
from offload.protocol.messages import _new_call, _new_result

SRC = Path(p.__file__).resolve().parent.parent  # src/offload

SAMPLE_VALUES = {
    "int": 7,
    "float": 1.5,
    "str": "héllo",
    "bytes": b"\x00pickle",
    "buffers": (b"one", b"two"),
}


def sample(cls: type[p.Message]) -> p.Message:
    """A message of ``cls`` with every field set to a non-default value."""
    return cls(**{name: SAMPLE_VALUES[kind] for name, kind in cls.FIELDS})


def field_values(msg: p.Message) -> dict[str, Any]:
    return {name: getattr(msg, name) for name, _ in msg.FIELDS}


@pytest.mark.parametrize("cls", p.MESSAGE_TYPES, ids=lambda cls: cls.__name__)
def test_no_message_can_be_mutated_after_creation(cls: type[p.Message]) -> None:
    msg = sample(cls)
    before = field_values(msg)
    for name, _ in cls.FIELDS:
        with pytest.raises(AttributeError, match="immutable"):
            setattr(msg, name, 0)
        with pytest.raises(AttributeError, match="immutable"):
            delattr(msg, name)
    with pytest.raises(AttributeError, match="immutable"):
        msg.extra = 1
    assert not hasattr(msg, "__dict__")  # slotted all the way down
    assert field_values(msg) == before


@pytest.mark.parametrize("cls", p.MESSAGE_TYPES, ids=lambda cls: cls.__name__)
def test_fields_slots_and_constructor_agree(cls: type[p.Message]) -> None:
    names = [name for name, _ in cls.FIELDS]
    assert sorted(cls.__slots__) == sorted(names)
    params = list(inspect.signature(cls).parameters.values())
    assert sorted(param.name for param in params) == sorted(names)
    assert all(param.kind is inspect.Parameter.KEYWORD_ONLY for param in params)
    assert field_values(sample(cls)) == {name: SAMPLE_VALUES[k] for name, k in cls.FIELDS}


def test_constructors_take_keywords_only() -> None:
    with pytest.raises(TypeError):
        p.Result(1, p.OK)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        p.Call(call_id=1, kind=p.BY_VALUE, timeout=0.0, target="t")  # type: ignore[call-arg]


def test_the_positional_constructors_make_what_the_keyword_ones_make() -> None:
    """The codec's fast paths build messages with _new_call/_new_result: the same
    messages as the public constructors."""
    call = p.Call(call_id=3, kind=p.BY_NAME, timeout=2.5, target="t", function=b"f", payload=b"x")
    made = _new_call(3, p.BY_NAME, 2.5, "t", b"f", b"x", ())
    assert made == call and type(made) is p.Call and repr(made) == repr(call)
    result = p.Result(
        call_id=4, status=p.RAISED, elapsed=0.5, type_name="E", message="m", traceback="tb"
    )
    made_result = _new_result(4, p.RAISED, 0.5, "E", "m", "tb", b"", ())
    assert made_result == result and repr(made_result) == repr(result)


def test_with_call_id_makes_a_new_result_and_leaves_the_old_one() -> None:
    result = p.Result(call_id=1, status=p.OK, elapsed=0.25, payload=b"v", buffers=(b"b",))
    relayed = result.with_call_id(99)
    assert relayed is not result
    assert result.call_id == 1
    assert field_values(relayed) == {**field_values(result), "call_id": 99}
    assert p.with_call_id(result, 99) == relayed


@pytest.mark.parametrize("cls", p.MESSAGE_TYPES, ids=lambda cls: cls.__name__)
def test_copy_and_pickle_make_equal_messages(cls: type[p.Message]) -> None:
    msg = sample(cls)
    for clone in (copy.copy(msg), copy.deepcopy(msg), pickle.loads(pickle.dumps(msg))):
        assert type(clone) is cls
        assert clone == msg
        assert hash(clone) == hash(msg)


def test_equality_is_by_value_and_buffers_by_content() -> None:
    one = p.Progress(call_id=1, payload=b"p", buffers=(b"abc",))
    same = p.Progress(call_id=1, payload=b"p", buffers=(memoryview(b"abc"),))
    assert one == same and hash(one) == hash(same)
    assert one != p.Progress(call_id=1, payload=b"p", buffers=(b"abd",))
    assert one != p.Progress(call_id=2, payload=b"p", buffers=(b"abc",))
    assert p.Cancel(call_id=1) != p.Kill(call_id=1)  # same fields, another message
    assert p.Shutdown() == p.Shutdown()


def test_repr_names_the_fields_and_shortens_large_payloads() -> None:
    msg = p.Result(call_id=5, status=p.OK, payload=b"x" * 100)
    assert repr(msg) == (
        "Result(call_id=5, status=0, elapsed=0.0, type_name='', message='', traceback='', "
        "payload='<100 bytes>', buffers=())"
    )
    assert repr(p.Shutdown()) == "Shutdown()"


def test_messages_dispatch_with_match() -> None:
    def route(msg: p.Message) -> str:
        match msg:
            case p.Result(call_id):
                return f"result {call_id}"
            case p.Ping(seq) | p.Pong(seq):
                return f"heartbeat {seq}"
            case p.Shutdown():
                return "shutdown"
        return "other"

    assert route(p.Result(call_id=3, status=p.OK)) == "result 3"
    assert route(p.Pong(seq=8)) == "heartbeat 8"
    assert route(p.Shutdown()) == "shutdown"
    assert route(p.Cancel(call_id=1)) == "other"


def test_output_carries_a_calls_bytes_on_a_stream() -> None:
    msg = p.Output(call_id=4, stream=p.STDERR, data=b"line\n")
    assert (p.STDOUT, p.STDERR) == (1, 2)  # the file descriptors the bytes were written to
    assert {"Output", "STDOUT", "STDERR"} <= set(p.__all__)
    match msg:
        case p.Output(call_id):
            assert call_id == 4
        case _:
            raise AssertionError(msg)
    assert msg == p.Output(call_id=4, stream=2, data=b"line\n")
    assert msg != p.Output(call_id=4, stream=p.STDOUT, data=b"line\n")
    assert repr(msg) == "Output(call_id=4, stream=2, data=b'line\\n')"


def test_message_types_are_a_closed_tagged_union() -> None:
    tags = [cls.TAG for cls in p.MESSAGE_TYPES]
    assert sorted(tags) == list(range(1, len(p.MESSAGE_TYPES) + 1))
    assert all(issubclass(cls, p.Message) for cls in p.MESSAGE_TYPES)
    assert {cls.__name__ for cls in p.MESSAGE_TYPES} <= set(p.__all__)


def test_wire_constants_are_exported_by_the_protocol() -> None:
    assert p.INIT_KIND == 2
    assert len({p.BY_VALUE, p.BY_NAME, p.INIT_KIND}) == 3
    statuses = [p.OK, p.RAISED, p.FAILED, p.BAD_ARGUMENT, p.BAD_RESULT, p.UNKNOWN_TASK]
    assert len(set(statuses)) == len(statuses)
    for name in ("INIT_KIND", "BY_VALUE", "BY_NAME", "OK", "PROTOCOL_VERSION"):
        assert name in p.__all__


# -- the import graph: the protocol and the token helpers stand below everything ----------


def offload_imports(path: Path) -> set[str]:
    """The ``offload.*`` modules that ``path`` imports, lazily or not."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "offload":
                found.update(f"offload.{alias.name}" for alias in node.names)
            elif node.module.startswith("offload."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("offload."))
    return found


@pytest.mark.parametrize(
    ("files", "allowed"),
    [
        ("protocol/*.py", ("offload.protocol", "offload.errors", "offload._version")),
        ("protocol/messages.py", ()),
        ("tokens.py", ("offload.protocol.auth", "offload.errors")),
    ],
)
def test_the_protocol_and_tokens_import_nothing_above_them(
    files: str, allowed: tuple[str, ...]
) -> None:
    paths = sorted(SRC.glob(files))
    assert paths
    for path in paths:
        for module in offload_imports(path):
            ok = any(module == a or module.startswith(f"{a}.") for a in allowed)
            assert ok, f"{path.relative_to(SRC)} imports {module}"


def test_channel_messages_route_by_call_and_relabel_for_relays() -> None:
    data = p.ChannelData(call_id=7, channel_id=3, kind=p.OBJECT, payload=b"x", buffers=(b"b",))
    for msg in (
        data,
        p.ChannelClose(call_id=7, channel_id=3, error=b"err"),
        p.ChannelCredit(call_id=7, channel_id=3, count=5),
    ):
        relayed = msg.with_call_id(99)  # type: ignore[attr-defined]
        assert type(relayed) is type(msg) and relayed is not msg
        assert field_values(relayed) == {**field_values(msg), "call_id": 99}
        assert msg.call_id == 7  # type: ignore[attr-defined]
        match msg:
            case p.ChannelData(call_id) | p.ChannelClose(call_id) | p.ChannelCredit(call_id):
                assert call_id == 7
            case _:
                raise AssertionError("channel messages match on their call id")
