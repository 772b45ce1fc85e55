"""map/imap_unordered progress bars (tqdm, optional) on a terminal."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator

import pytest

import offload


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal, and keeps what is written."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def pool() -> Iterator[offload.Pool]:
    with offload.Pool(1) as p:
        yield p


def test_progress_bar_on_a_terminal(pool: offload.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert list(pool.map(abs, range(-50, 50), progress=True)) == [abs(i) for i in range(-50, 50)]
    assert sorted(pool.imap_unordered(abs, range(10), progress=True)) == list(range(10))
    out = term.getvalue()
    assert "100/100" in out and "10/10" in out, out


def test_no_bar_when_stderr_is_not_a_terminal(
    pool: offload.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = io.StringIO()  # isatty() is False
    monkeypatch.setattr(sys, "stderr", pipe)
    assert list(pool.map(abs, range(10), progress=True)) == list(range(10))
    assert pipe.getvalue() == ""


def test_missing_tqdm_is_a_clear_error(pool: offload.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now fails
    with pytest.raises(ImportError, match=r"offload\[progress\]"):
        pool.map(abs, range(3), progress=True)
