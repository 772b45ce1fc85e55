"""The mypy plugin ``offload.mypy_plugin``: actor method calls are typed.

Runs mypy (in a subprocess, with a cache directory of the test's own) on a small file
that uses an actor handle, and reads what it reveals and reports.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy")

SAMPLE = """
import offload

class Counter(offload.Actor):
    def __init__(self, start: int = 0) -> None:
        self.n = start

    def add(self, k: int) -> int:
        self.n += k
        return self.n

    def name_of(self, key: str, *, upper: bool = False) -> str:
        return key.upper() if upper else key

    @property
    def doubled(self) -> int:
        return 2 * self.n

c = Counter.spawn(5)
reveal_type(c.add)
reveal_type(c.add(2))
reveal_type(c.name_of("k", upper=True))
reveal_type(c.call(Counter.add, 2))
reveal_type(c.pid)
c.add("two")
c.doubled
c.nope
c.call(Counter.add, "two")
Counter.spawn("five")
"""


def run_mypy(tmp_path: Path, *, plugin: bool) -> list[str]:
    (tmp_path / "sample.py").write_text(textwrap.dedent(SAMPLE))
    config = "[mypy]\nstrict = True\n" + ("plugins = offload.mypy_plugin\n" if plugin else "")
    (tmp_path / "mypy.ini").write_text(config)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            "mypy.ini",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--no-error-summary",
            "sample.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "INTERNAL ERROR" not in out.stdout + out.stderr, out.stdout + out.stderr
    return [line.split(": ", 1)[1] for line in out.stdout.splitlines() if ": " in line]


def test_the_plugin_types_methods_as_returning_futures(tmp_path: Path) -> None:
    lines = run_mypy(tmp_path, plugin=True)
    future = "offload.client.future.Future"
    assert lines[:5] == [
        f'note: Revealed type is "def (k: int) -> {future}[int]"',
        f'note: Revealed type is "{future}[int]"',
        f'note: Revealed type is "{future}[str]"',
        f'note: Revealed type is "{future}[int]"',
        'note: Revealed type is "int | None"',  # the handle's own attributes stay
    ], lines
    errors = lines[5:]
    assert len(errors) == 5, lines
    assert 'Argument 1 to "add" of "Counter" has incompatible type "str"' in errors[0]
    assert 'has no method "doubled" (Counter.doubled: a property)' in errors[1]
    assert 'has no method "nope"' in errors[2]
    assert 'Argument 2 to "call" of "ActorHandle" has incompatible type "str"' in errors[3]
    assert 'Argument 1 to "spawn" of "Actor" has incompatible type "str"' in errors[4]


def test_without_the_plugin_call_is_still_typed(tmp_path: Path) -> None:
    lines = run_mypy(tmp_path, plugin=False)
    assert 'note: Revealed type is "Any"' in lines[0]  # c.add: found at run time
    assert 'note: Revealed type is "offload.client.future.Future[int]"' in lines
    assert any('Argument 2 to "call" of "ActorHandle"' in line for line in lines)
