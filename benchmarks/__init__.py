"""Benchmarks: offload against ProcessPoolExecutor, multiprocessing.Pool, loky, pebble,
mpire, Pyro5 and rpyc, and raw floors (processes exchanging length-prefixed pickles over
socketpairs, one call at a time or pipelined; bare interpreter starts and forks).

Single workers: round trip, worker death → error, per-call timeout, cold start. Pools of
2: many tiny calls submitted at once, ``map``, cold start, a killed and a timed-out call in
a forkserver pool. Remote: ``offload serve`` over loopback TCP and TLS. Optional peers
that are not installed are listed as skipped.

Run ``python -m benchmarks`` (``--quick`` for a smoke run, ``--markdown`` for the README
table). Every number is measured in the same run on the same machine.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

#: The folder holding the ``benchmarks`` package: worker processes that start a fresh
#: interpreter must be able to import ``benchmarks.tasks`` by reference.
ROOT = str(Path(__file__).resolve().parent.parent)


def make_importable() -> None:
    """Put :data:`ROOT` on ``sys.path`` and ``PYTHONPATH`` (inherited by children)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *paths])


T = TypeVar("T")


class Skipped(Exception):
    """A contender that cannot run here; its message is printed in the table."""


NOT_INSTALLED = "skipped (not installed)"


def failure(exc: BaseException) -> str:
    """How a contender failed, for the table."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"failed: {type(exc).__name__}" + (f": {text[:100]}" if text else "")


def attempt(factory: Callable[[], T]) -> tuple[T | None, str]:
    """Build a contender: ``(it, "")``, or ``(None, note)`` saying in the table why not
    (a peer that is not installed, or how starting it failed)."""
    try:
        return factory(), ""
    except Skipped as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return None, failure(exc)


def require(module: str) -> object:
    """Import an optional peer (loky, pebble, mpire, Pyro5, rpyc, cryptography) or raise
    :class:`Skipped`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise Skipped(NOT_INSTALLED) from None
