"""Starting a worker process: :func:`launch`, the switch on the start method.

=============  ===================================  ==============================
start method   how                                  module
=============  ===================================  ==============================
``spawn``      a fresh interpreter (``python -c``)  :mod:`offload.process.spawn`
``reexec``     this program, run again              :mod:`offload.process.spawn`
``fork``       a fork of this process               :mod:`offload.process.fork`
``forkserver`` a fork of a warm template process    :mod:`offload.process.forkserver`
=============  ===================================  ==============================

Each returns a :class:`~offload.process.child.ChildProcess` (watching, killing and
reaping it are the same for all) and the parent's end of the worker's socketpair. In the
import graph this module stands above the start methods, which stand above
:mod:`offload.process.child`, which stands above :mod:`offload.process.spec`.
"""

from __future__ import annotations

import _socket as socket  # not the socket package (see offload.process.spawn)
from collections.abc import Callable

from offload.process.child import ChildProcess
from offload.process.spawn import launch_spawn
from offload.process.spec import LaunchSpec
from offload.transport.loop import Loop

TYPE_CHECKING = False  # not typing's: a fresh program's first pool imports no typing
if TYPE_CHECKING:
    from typing import Any

__all__ = ["LaunchSpec", "launch"]


def launch(
    spec: LaunchSpec, loop: Loop, on_exit: Callable[[ChildProcess], Any]
) -> tuple[ChildProcess, socket.socket]:
    """Start a worker process; return it and the parent's end of its socketpair.

    ``on_exit(child)`` is called on the loop thread when the process has exited. Must
    run on the loop thread (see :mod:`offload.transport.loop`).

    Raises:
        OSError: the process could not be started (e.g. the interpreter does not exist,
            or a stdout/stderr file cannot be opened).
        ValueError: an unknown start method.
    """
    for mode in (spec.stdout, spec.stderr):
        if mode not in ("inherit", "devnull", "prefix"):
            open(mode, "ab").close()
    if spec.start_method == "fork":
        # Imported when first used, like the forkserver: a pool that spawns never needs it.
        from offload.process.fork import launch_fork

        return launch_fork(spec, loop, on_exit)
    if spec.start_method == "forkserver":
        # Imported when first used: most programs never start a template process.
        from offload.process.forkserver import launch_via_forkserver

        return launch_via_forkserver(spec, loop, on_exit)
    return launch_spawn(spec, loop, on_exit)
