"""The README's opening example runs as written, and so does the demo."""

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
