"""``offload.init()``: the program as its own worker (Procord, zng, Docker's spawn).

Call it first thing in ``main``. In a process started as a worker with
``start_method="reexec"`` it runs the worker loop and never returns; anywhere else it sets
the defaults that :func:`offload.delegate` uses and returns.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from offload.worker.runtime import SETTINGS_ENV


def is_worker_process() -> bool:
    """Whether this process was started as an offload worker."""
    return SETTINGS_ENV in os.environ


def init(argv: list[str] | None = None, **delegate_options: Any) -> None:
    """Make this program able to act as its own worker; call it first in ``main``.

    * In a process that offload re-executed as a worker (``start_method="reexec"``),
      run the worker loop; this never returns.
    * Otherwise, record ``delegate_options`` (any worker option, e.g.
      ``start_method="reexec"``) as the defaults of :func:`offload.delegate`. The
      environment variable ``OFFLOAD_START_METHOD`` sets the start method when no
      keyword does.

    Args:
        argv: the argument list to read offload's options from (default ``sys.argv``).
        **delegate_options: default worker options for :func:`offload.delegate`.

    Raises:
        TypeError, ValueError: an unknown or invalid option.
    """
    if is_worker_process():
        from offload.worker.runtime import run_worker

        run_worker()
    from offload.client.options import make_options
    from offload.client.worker import set_delegate_defaults

    options = dict(delegate_options)
    env_method = os.environ.get("OFFLOAD_START_METHOD")
    if env_method and "start_method" not in options:
        options["start_method"] = env_method
    make_options(**options)  # validate now, not at the first delegate()
    set_delegate_defaults(**options)
    _ = argv if argv is not None else sys.argv
