"""The public names of the SPEC exist, have docstrings, and the package imports lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import offload


@pytest.mark.parametrize("name", offload.__all__)
def test_every_public_name_resolves_and_is_documented(name: str) -> None:
    value = getattr(offload, name)
    if name != "__version__":
        assert (value.__doc__ or "").strip(), f"offload.{name} has no docstring"


def test_dir_lists_the_public_names() -> None:
    assert set(offload.__all__) <= set(dir(offload))


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = offload.nope  # type: ignore[attr-defined]


def test_worker_start_up_imports_stay_small() -> None:
    # A worker imports offload.worker.loop first; keep the client side, typing and
    # hashlib out of it (each costs milliseconds on every worker start).
    code = "import sys; import offload.worker.loop; print(' '.join(sorted(m for m in sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    for heavy in ("offload.client.engine", "typing", "hashlib", "cloudpickle", "psutil"):
        assert heavy not in out, f"{heavy} is imported at worker start-up"
