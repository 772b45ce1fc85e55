"""Functions that travel by value (lambdas, closures, ``__main__`` functions): pickled
once and reused while what they capture is unchanged, in the parent
(``offload.client.by_value``) and in the worker (which keeps what it unpickled, keyed by
the pickle). Every change of what a function captures must reach the worker: a rebound
or mutated capture, a rebound global, a redefined function or helper; locally and
through ``offload serve``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import offload
from crashes import wait_until
from offload.client import by_value
from offload.client.by_value import function_by_value
from remote_helpers import ServerProcess, write_token_file

WAIT = 30.0
TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def pool() -> Iterator[offload.Pool]:
    """One worker: every call meets the functions earlier calls left in its cache."""
    with offload.Pool(workers=1) as pool:
        assert wait_until(lambda: pool.stats().idle == 1, WAIT), pool.stats()
        yield pool


def _make_adder(k: int) -> Callable[[int], int]:
    def add(x: int) -> int:
        return x + k

    return add


def _constant(k: Any) -> Callable[[], Any]:
    return lambda: k


# -- the parent's cache ----------------------------------------------------------------


def test_an_unchanged_function_is_pickled_once() -> None:
    k = 5
    fn = lambda x: x + k  # noqa: E731 - a lambda is the point
    first = function_by_value(fn)
    assert first
    assert function_by_value(fn) is first  # the same pickle, not a new one
    # Plain captures: later calls compare what it holds, without a snapshot.
    for plain in (fn, _make_adder(3), _constant(("a", b"b", None, True))):
        function_by_value(plain)
        assert plain in by_value._recent, plain
    over_a_list = _constant([1])
    assert function_by_value(over_a_list)
    assert over_a_list not in by_value._recent  # a list can change in place


def test_a_change_of_what_it_captures_makes_a_new_pickle() -> None:
    k = 5
    items = [1]
    fn = lambda: (k, items)  # noqa: E731
    first = function_by_value(fn)
    items.append(2)  # mutated in place
    second = function_by_value(fn)
    assert second != first
    k = 6  # rebound
    assert function_by_value(fn) not in (first, second)


_OFFSET = 1  # a global that a lambda below names


def test_the_remembered_pickle_sees_every_change_of_plain_captures() -> None:
    """A function whose captures are plain immutable data is checked by the identity of
    what it holds (no snapshot): every change must still make a new pickle."""
    k = 1
    fn = lambda x=1: x + k + _OFFSET + len("")  # noqa: E731
    pickles = [function_by_value(fn)]
    assert function_by_value(fn) is pickles[0]  # nothing changed: the very same pickle
    module = globals()
    try:
        k = True  # an equal value of another type (both plain data)
        pickles.append(function_by_value(fn))
        k = 2  # a rebound cell
        pickles.append(function_by_value(fn))
        module["_OFFSET"] = 2  # a rebound global
        pickles.append(function_by_value(fn))
        module["len"] = 0  # a global now shadowing a builtin it names (plain data)
        pickles.append(function_by_value(fn))
        fn.__defaults__ = (3,)
        pickles.append(function_by_value(fn))
        fn.__code__ = (lambda x=1: x * k).__code__  # the same free variables, new code
        pickles.append(function_by_value(fn))
        fn.note = "an attribute"  # type: ignore[attr-defined]
        pickles.append(function_by_value(fn))
    finally:
        module["_OFFSET"] = 1
        module.pop("len", None)
    assert all(pickles) and len(set(pickles)) == len(pickles), pickles
    assert fn() == 3 * k


def test_captures_changed_by_another_thread_while_pickling_are_never_remembered_wrong() -> None:
    """Threads pickle one closure while another rebinds what it captures (small ints:
    the same objects come back): whatever the interleaving, once the captures stop
    changing, the pickle is of their last values (a pickle remembered under values it
    was not made from would run stale ones when those values come back)."""
    import threading

    import cloudpickle

    get, set_k = _captured_pair()
    start = threading.Barrier(4)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns within the pickling, not only between

    def pickle_often() -> None:
        start.wait()
        for _ in range(3000):
            function_by_value(get)

    threads = [threading.Thread(target=pickle_often) for _ in range(3)]
    for t in threads:
        t.start()
    start.wait()
    for i in range(3000):
        set_k(i % 7)
    for t in threads:
        t.join()
    sys.setswitchinterval(interval)
    for final in [*range(7), *range(7)]:  # the values of the storm, each object again
        set_k(final)
        assert cloudpickle.loads(function_by_value(get))() == final


def _captured_pair() -> tuple[Callable[[], int], Callable[[int], None]]:
    """A closure over ``k``, and a function that rebinds ``k``."""
    k = 0

    def get() -> int:
        return k

    def set_k(value: int) -> None:
        nonlocal k
        k = value

    return get, set_k


def test_functions_of_one_code_with_other_captures_get_their_own_pickles() -> None:
    one, two, also_one = _make_adder(1), _make_adder(2), _make_adder(1)
    assert function_by_value(one) != function_by_value(two)
    assert function_by_value(also_one) == function_by_value(one)


def test_equal_captures_of_other_types_are_other_captures(pool: offload.Pool) -> None:
    """1, 1.0 and True are equal (and hash alike), -0.0 and 0.0 too: each must still
    reach the worker as itself."""
    values = [1, True, 1.0, 0.0, -0.0, 0, False, (1,), (True,)]
    results = [pool.submit(_constant(v)).result(WAIT) for v in values]
    assert [(type(r), repr(r)) for r in results] == [(type(v), repr(v)) for v in values]


def test_a_closure_over_large_data_travels_with_its_arguments(pool: offload.Pool) -> None:
    """Too large to remember (a list: snapshotted with the C pickler, which gives up
    early; bytes: plain data, but too large a pickle): pickled with every call."""
    items = list(range(100_000))
    blob = b"x" * 200_000
    fn = lambda: (len(items), items[-1], len(blob))  # noqa: E731
    assert function_by_value(fn) == b""
    assert pool.submit(fn).result(WAIT) == (100_000, 99_999, 200_000)
    items.append(-1)
    assert pool.submit(fn).result(WAIT) == (100_001, -1, 200_000)


def test_a_recursive_closure_is_snapshotted() -> None:
    def fact(n: int) -> int:
        return 1 if n <= 1 else n * fact(n - 1)

    assert function_by_value(fact)


def test_what_is_not_a_plain_function_travels_with_its_arguments() -> None:
    import functools

    assert function_by_value(functools.partial(abs, -1)) == b""
    assert function_by_value(abs) == b""


# -- local workers -----------------------------------------------------------------------


def test_a_closure_runs_with_its_current_captures(pool: offload.Pool) -> None:
    k = 1
    scale = [2]
    fn = lambda x: (x + k) * scale[0]  # noqa: E731
    assert pool.submit(fn, 1).result(WAIT) == 4
    k = 10  # a rebound capture
    assert pool.submit(fn, 1).result(WAIT) == 22
    scale[0] = 3  # a capture mutated in place
    assert pool.submit(fn, 1).result(WAIT) == 33
    assert pool.submit(fn, 1).result(WAIT) == 33


def test_lambdas_of_one_code_with_other_captures_each_run_their_own(
    pool: offload.Pool,
) -> None:
    makers = [_constant(i) for i in range(5)]
    assert [pool.submit(f).result(WAIT) for f in makers] == [0, 1, 2, 3, 4]
    adders = [_make_adder(i) for i in (1, 2, 1)]
    assert [pool.submit(f, 10).result(WAIT) for f in adders] == [11, 12, 11]


def test_a_by_value_function_raises_and_fails_as_before(pool: offload.Pool) -> None:
    fn = lambda: 1 / 0  # noqa: E731
    for _ in range(2):
        with pytest.raises(ZeroDivisionError):
            pool.submit(fn).result(WAIT)
    lock = __import__("threading").Lock()
    with pytest.raises(offload.SerializationError):
        pool.submit(lambda: lock).result(WAIT)  # cannot be pickled: fails as before


def test_the_worker_keeps_one_copy_per_pickle(pool: offload.Pool) -> None:
    """The documented consequence: state a cached function changes in the worker (here
    its default list) persists there for later calls with the same pickle."""
    fn = lambda acc=[]: (acc.append(1), len(acc))[1]  # noqa: E731
    assert [pool.submit(fn).result(WAIT) for _ in range(3)] == [1, 2, 3]


# -- functions of __main__ -----------------------------------------------------------------

_MAIN_SCRIPT = """
import json, sys
import offload

G = 1

def helper():
    return "helper 1"

def f():
    return (G, helper())

out = []
if sys.argv[1] == "local":
    pool = offload.Pool(workers=1)
else:
    pool = offload.connect(sys.argv[1], token=sys.argv[2])
with pool:
    out.append(pool.submit(f).result(30))
    out.append(pool.submit(f).result(30))
    G = 2                           # a global it reads, rebound
    out.append(pool.submit(f).result(30))

    def helper():                   # a helper it calls, redefined
        return "helper 2"

    out.append(pool.submit(f).result(30))

    def f():                        # itself, redefined
        return ("redefined", G)

    out.append(pool.submit(f).result(30))
    out.append(pool.submit(lambda: f()).result(30))
print(json.dumps(out))
"""
_EXPECTED = [
    [1, "helper 1"],
    [1, "helper 1"],
    [2, "helper 1"],
    [2, "helper 2"],
    ["redefined", 2],
    ["redefined", 2],
]


def _run_main(*args: str) -> list[Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MAIN_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: list[Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_main_functions_see_rebound_globals_and_redefinitions() -> None:
    assert _run_main("local") == _EXPECTED


# -- remote ----------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """An ``offload serve`` with one worker on 127.0.0.1: (address, token)."""
    token_path, token = write_token_file(tmp_path)
    proc = ServerProcess(
        tmp_path, ["--listen", "127.0.0.1:0", "--token-file", str(token_path), "--workers", "1"]
    )
    proc.start()
    try:
        yield proc.address, token.decode()
    finally:
        if proc.stop() != 0:
            pytest.fail(f"offload serve exited with an error:\n{proc.output()}")


def test_remote_closures_run_with_their_current_captures(server: tuple[str, str]) -> None:
    address, token = server
    with offload.connect(address, token=token) as worker:
        k = 1
        fn = lambda x: x + k  # noqa: E731
        assert worker.submit(fn, 1).result(WAIT) == 2
        assert worker.submit(fn, 1).result(WAIT) == 2
        k = 5
        assert worker.submit(fn, 1).result(WAIT) == 6
        makers = [_constant(i) for i in range(3)]
        assert [worker.submit(f).result(WAIT) for f in makers] == [0, 1, 2]


def test_remote_main_functions_see_rebound_globals_and_redefinitions(
    server: tuple[str, str],
) -> None:
    assert _run_main(*server) == _EXPECTED
