"""Checks what ``python -m build`` made in DIST (``make dist`` runs it after twine).

The wheel: the ``offload`` package with its ``py.typed``, the LICENSE, the version of
``src/offload/_version.py``; no tests, no bytecode, no ``__pycache__``, nothing outside
``offload/`` and its ``.dist-info``; the development dependency groups are not extras.

The sdist: every file git tracks under tests/, examples/ and docs/ (the helper modules
workers import, the pages and examples the tests run as written), no bytecode; and its
test suite runs: in the unpacked sdist, against the sdist's own ``src``, pytest collects
every test, and the tests that read the README and the example files pass.

Usage: python tools/check_dist.py DIST
"""

from __future__ import annotations

import ast
import email.parser
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Tests that need files from the checkout besides the tests themselves.
SDIST_TESTS_RUN = ["tests/test_readme.py", "tests/test_public_api.py"]


def fail(message: str) -> None:
    print(f"check_dist: {message}", file=sys.stderr)
    sys.exit(1)


def version() -> str:
    tree = ast.parse((ROOT / "src/offload/_version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__version__":
            return str(ast.literal_eval(node.value))
    fail("no __version__ in src/offload/_version.py")
    raise AssertionError


def only(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        fail(f"expected one {pattern} in {dist}, found {[p.name for p in found]}")
    return found[0]


def check_wheel(wheel: Path, want_version: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"offload-{want_version}.dist-info"
        stray = [n for n in names if not n.startswith(("offload/", f"{info}/"))]
        if stray:
            fail(f"{wheel.name} has files outside offload/ and {info}/: {stray}")
        bytecode = [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
        if bytecode:
            fail(f"{wheel.name} has bytecode: {bytecode[:5]}")
        tests = [n for n in names if "/tests/" in n or Path(n).name.startswith("test_")]
        if tests:
            fail(f"{wheel.name} has tests: {tests[:5]}")
        for required in (
            "offload/__init__.py",
            "offload/py.typed",
            "offload/worker/__main__.py",
            f"{info}/licenses/LICENSE",
            f"{info}/entry_points.txt",
        ):
            if required not in names:
                fail(f"{wheel.name} lacks {required}")
        meta = email.parser.Parser().parsestr(zf.read(f"{info}/METADATA").decode())
    if meta["Version"] != want_version:
        fail(f"wheel metadata says version {meta['Version']}, _version.py {want_version}")
    extras = set(meta.get_all("Provides-Extra") or [])
    if extras != {"progress"}:
        fail(f"public extras should be just 'progress', are {sorted(extras)}")
    classifiers = set(meta.get_all("Classifier") or [])
    for required in ("Typing :: Typed", "Programming Language :: Python :: 3.10"):
        if required not in classifiers:
            fail(f"classifier {required!r} missing")
    if meta["Description-Content-Type"] != "text/markdown":
        fail(f"long description type is {meta['Description-Content-Type']!r}")
    if "make " in meta.get_payload():
        fail("the PyPI description mentions make commands (checkout-only)")
    print(f"check_dist: {wheel.name}: {len(names)} files, py.typed, no tests, no bytecode")


def tracked(*folders: str) -> list[str]:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--", *folders],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [line for line in out.splitlines() if line]


def check_sdist(sdist: Path, want_version: str) -> None:
    top = f"offload-{want_version}"
    with tarfile.open(sdist) as tf:
        names = {m.name.removeprefix(f"{top}/") for m in tf.getmembers() if m.isfile()}
        bytecode = [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
        if bytecode:
            fail(f"{sdist.name} has bytecode: {bytecode[:5]}")
        want = set(tracked("tests", "examples", "docs", "src")) | {
            "README.md",
            "PYPI.md",
            "LICENSE",
            "CHANGELOG.md",
            "pyproject.toml",
        }
        missing = sorted(n for n in want if n not in names and (ROOT / n).exists())
        if missing:
            fail(f"{sdist.name} lacks {missing}")
        with tempfile.TemporaryDirectory() as tmp:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # Python < 3.10.12 / 3.11.4: our own sdist, just built
                tf.extractall(tmp)
            run_sdist_tests(Path(tmp) / top)
    print(f"check_dist: {sdist.name}: {len(names)} files; its tests collect and run")


def run_sdist_tests(tree: Path) -> None:
    """Collect the sdist's whole suite and run the tests that read its files, with the
    sdist's own source first on the path (its workers inherit PYTHONPATH)."""
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), PYTHONDONTWRITEBYTECODE="1")
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    collect = subprocess.run(
        [*base, "--collect-only"], check=False, cwd=tree, env=env, capture_output=True, text=True
    )
    if collect.returncode != 0:
        fail(f"the sdist's tests do not collect:\n{collect.stdout[-4000:]}{collect.stderr}")
    print(f"check_dist: sdist: {collect.stdout.strip().splitlines()[-1]}")
    probe = subprocess.run(
        [sys.executable, "-c", "import offload; print(offload.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(probe).is_relative_to(tree):
        fail(f"the sdist's tests would import offload from {probe}, not the sdist")
    run = subprocess.run([*base, *SDIST_TESTS_RUN], check=False, cwd=tree, env=env)
    if run.returncode != 0:
        fail("the sdist's tests failed")


def main() -> None:
    if len(sys.argv) != 2:
        fail("usage: check_dist.py DIST")
    dist = Path(sys.argv[1])
    want_version = version()
    check_wheel(only(dist, "*.whl"), want_version)
    check_sdist(only(dist, "*.tar.gz"), want_version)


if __name__ == "__main__":
    main()
