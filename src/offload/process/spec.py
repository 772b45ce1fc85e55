"""What it takes to start one worker process: :class:`LaunchSpec`.

The bottom of :mod:`offload.process`: every start method (and the forkserver's template
process, which receives specs pickled) reads it; it imports only the worker's settings.
"""

from __future__ import annotations

import sys

from offload._record import field, record  # not dataclasses: see offload._record
from offload.worker.settings import WorkerSettings


@record(frozen=True)
class LaunchSpec:
    """Everything needed to start one worker process.

    Attributes:
        name: the worker's name.
        start_method: ``"spawn"``, ``"reexec"``, ``"fork"`` or ``"forkserver"``.
        python: the interpreter (``spawn``, ``forkserver``).
        env: environment variables added to the parent's.
        cwd: the worker's working directory (None: the parent's).
        umask: the worker's umask (None: the parent's).
        stdout, stderr: ``"inherit"``, ``"devnull"``, ``"prefix"`` or a file path.
        pipe_stdout: read stdout through a pipe whatever its mode (the mode then says
            where the bytes go): a worker server relays its workers' output to its
            clients (:attr:`ChildProcess.output_hook
            <offload.process.child.ChildProcess.output_hook>`).
        settings: the worker's settings; the launch fills in ``fd``, ``name``, ``ppid``
            and ``sys_path`` (:meth:`worker_settings`).
    """

    name: str
    start_method: str = "spawn"
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    umask: int | None = None
    stdout: str = "inherit"
    stderr: str = "inherit"
    pipe_stdout: bool = False
    settings: WorkerSettings = field(default_factory=WorkerSettings)

    def worker_settings(self, fd: int, ppid: int) -> WorkerSettings:
        """The settings of the worker started for this spec, on socket ``fd``, by the
        process ``ppid``, with this process's ``sys.path``."""
        return self.settings.replace(
            fd=fd, name=self.name, ppid=ppid, sys_path=tuple(p for p in sys.path if p)
        )
