"""What happens to engines when the interpreter exits or forks.

* **Exit.** Every call already submitted runs to completion (as with
  ``ProcessPoolExecutor``), its done-callbacks fire, then the workers stop: a pool or
  handle that was never shut down, a ``delegate()`` call, a ``shutdown(wait=False)`` --
  nothing submitted vanishes. The hook runs from ``threading._shutdown``, before
  ``atexit`` and before daemon threads (offload's I/O loop) are frozen, so results still
  arrive. Ctrl-C while it waits kills what still runs.
* **Fork.** A forked child's inherited engines are its parent's: none is waited for at
  the child's exit, and every use of one there raises (the engine compares
  :data:`forks`, which each fork's child increments, with the value it was made under).
"""

from __future__ import annotations

import os
import threading
import weakref

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object  # the protocol below is for type checkers only

# At exit, how long the workers of each engine get to exit after its calls are done.
EXIT_STOP_TIMEOUT = 5.0

forks = 0  # forks between the interpreter's start and this process


class Tracked(Protocol):
    """What the exit hook needs of an engine."""

    def owned_here(self) -> bool: ...
    def wait_calls(self, timeout: float | None) -> bool: ...
    def shutdown(self, *, wait: bool, cancel_futures: bool, timeout: float | None) -> None: ...
    def abort(self) -> None: ...
    def barrier(self) -> None: ...


_tracked: weakref.WeakSet[Tracked] = weakref.WeakSet()


def track(engine: Tracked) -> None:
    """Finish ``engine``'s calls at exit (it is forgotten when it is collected)."""
    _tracked.add(engine)


def forget(engine: Tracked) -> None:
    """Do not wait for ``engine`` at exit (tests driving an engine with no workers)."""
    _tracked.discard(engine)


def _finish_at_exit() -> None:
    engines = [engine for engine in list(_tracked) if engine.owned_here()]
    if not engines:
        return
    try:
        for engine in engines:
            engine.wait_calls(None)
        for engine in engines:
            engine.shutdown(wait=True, cancel_futures=False, timeout=EXIT_STOP_TIMEOUT)
    except BaseException:
        for engine in engines:
            engine.abort()
        raise
    engines[0].barrier()  # the I/O thread may still be running the last callbacks


def _after_fork_in_child() -> None:
    global _tracked, forks
    _tracked = weakref.WeakSet()
    forks += 1


os.register_at_fork(after_in_child=_after_fork_in_child)
threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]
