"""A pytest plugin (registered through the ``pytest11`` entry point) that lets
``start_method="reexec"`` work under pytest.

A reexec worker re-runs the program that started it; under pytest that program is
pytest itself. Plugins are imported before pytest captures output or collects tests, so
this is the earliest moment to call :func:`offload.init`, which turns such a process into
the worker it was started to be (with its real stdout and stderr). In every other
process it does nothing.
"""

from __future__ import annotations

from offload.program import init, is_worker_process

if is_worker_process():
    init()
