"""Tasks for ``test_debugging.py`` (crash dumps, replay, workers started by hand).

Workers and replays import this module by reference (``tests/`` is on the ``sys.path``
that workers inherit and that a crash dump records), so everything here is at module
level. Each task ends its process with a status that says what it saw, so a replay in a
subprocess proves by its exit status that the call came back with its arguments, its
initializer and its environment.
"""

from __future__ import annotations

import os

import offload

REMEMBERED = 0  # set by the initializer remember()
EXTRA_ENV = "DEBUG_TASKS_EXTRA"


def remember(value: int) -> None:
    """An initializer: keep ``value`` for :func:`exit_with_remembered`."""
    global REMEMBERED
    REMEMBERED = value


@offload.task(name="debug-exit-with-remembered")
def exit_with_remembered(add: int) -> None:
    """Exit now with status REMEMBERED (the initializer's) + ``$DEBUG_TASKS_EXTRA`` + ``add``."""
    os._exit(REMEMBERED + int(os.environ.get(EXTRA_ENV, "0")) + add)


def exit_with_size(data: bytes, offset: int = 0) -> None:
    """Exit now with status ``len(data) % 100 + offset``: an out-of-band buffer arrived."""
    os._exit(len(data) % 100 + offset)
