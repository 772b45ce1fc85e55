"""The README's opening example runs as written, and so do the PyPI description's
example and the demo."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_opening_example_runs(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S)
    assert example is not None
    code = example.group(1)
    assert len(code.strip().splitlines()) <= 10, "the opening example must stay 10 lines"
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "ZeroDivisionError('division by zero')" in out


def readme_blocks() -> list[tuple[int, str, str | None]]:
    """Every ```python block of the README after the opening one: (line, code, the guide
    pages it is an excerpt of, space-separated, if it says so)."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for match in re.finditer(r"(<!-- excerpt: ([^>]+?) -->\n)?```python\n(.*?)```", text, re.S):
        line = text.count("\n", 0, match.start(3))
        blocks.append((line, match.group(3), match.group(2)))
    return blocks[1:]


def test_readme_examples_run_or_point_to_the_guide_page_that_runs_them(tmp_path: Path) -> None:
    """A README block runs as written, unless it says it is an excerpt of a guide page
    (whose examples tests/test_docs_examples.py runs): those pages must exist and show
    the same calls."""
    blocks = readme_blocks()
    assert blocks, "the README shows more than its opening example"
    for line, code, page in blocks:
        if page is not None:
            guide = "".join((ROOT / name).read_text() for name in page.split())
            for call in re.findall(r"offload\.\w+", code):
                assert call in guide, f"README line {line}: {call} is not shown in {page}"
            continue
        script = tmp_path / f"block{line}.py"
        script.write_text(code)
        proc = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, f"README line {line}:\n{proc.stderr[-3000:]}"


def test_pypi_description_example_runs(tmp_path: Path) -> None:
    text = (ROOT / "PYPI.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S)
    assert example is not None
    script = tmp_path / "example.py"
    script.write_text(example.group(1))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.splitlines() == [
        str(sum(i * i for i in range(10_000_000))),
        "ZeroDivisionError('division by zero')",
        str([sum(i * i for i in range(n)) for n in range(10)]),
    ]


def test_demo_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "WorkerCrashed" in out and "SIGSEGV" in out
    assert "WorkerKilled" in out and "TaskTimeout" in out
    # The same calls through an `offload serve` on loopback, a crash included.
    assert "worker server on 127.0.0.1:" in out
    assert "remote square(12)            -> 144" in out
    assert "remote segfault()            -> WorkerCrashed" in out
    assert "remote square(3), after it   -> 9" in out
    assert "no worker left behind" in out
