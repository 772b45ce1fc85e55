"""The actors this process hosts, and the call of one of their methods.

An actor's method calls travel as ordinary calls of :func:`actor_method` (a module-level
function: it travels by reference, pickled once per process, so an actor call costs
what a pool call costs). Which actor it calls depends on the door the call came in by:

* the channel to the creator of a spawned actor (the worker's own loop, on its main
  thread or its executor threads): the actor of this process, :func:`set_process_actor`;
* a listener's thread (:mod:`offload.server.host`, for the other holders of the
  handle): the actor that listener serves, bound to its threads with :func:`bind_thread`
  -- so one process can serve several actors (``Actor.serve``).

Imports nothing of offload's: a worker imports it when its first actor call arrives.
"""

from __future__ import annotations

import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_process_actor: Any = None
_door = threading.local()  # .actor: the actor the calls of this thread go to


def set_process_actor(instance: object) -> None:
    """Make ``instance`` the actor of this process (a spawned actor's worker)."""
    global _process_actor
    _process_actor = instance


def bind_thread(instance: object) -> None:
    """The calls that run on this thread go to ``instance`` (a listener's thread)."""
    _door.actor = instance


def actor_method(name: str, /, *args: Any, **kwargs: Any) -> Any:
    """Call method ``name`` of the actor this call came to, with the arguments.

    Raises:
        LookupError: no actor is hosted behind this door (it was shut down).
        AttributeError: the actor has no method ``name`` (the handle checks first).
        Exception: whatever the method raises, as itself.
    """
    # Through the thread's own __dict__: getattr(_door, "actor", None) on a thread
    # with none raises and swallows an AttributeError, a few microseconds per call.
    instance = _door.__dict__.get("actor", _process_actor)
    if instance is None:
        raise LookupError("no actor is hosted here (it was shut down)")
    return getattr(instance, name)(*args, **kwargs)
