"""offload: run Python calls in other processes; futures that always resolve.

Quick start::

    import offload

    with offload.spawn() as w:
        print(w.call(pow, 2, 10))          # 1024, computed in another process

Public names are imported lazily so that a worker process, which imports this package
first, starts fast.
"""

from __future__ import annotations

from offload._version import __version__

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs a worker ~2 ms

if TYPE_CHECKING:
    from typing import Any

    from offload.actor import Actor as Actor
    from offload.actor import ActorHandle as ActorHandle
    from offload.client.future import (
        Cancelled as Cancelled,
    )
    from offload.client.future import (
        Failed as Failed,
    )
    from offload.client.future import (
        Future as Future,
    )
    from offload.client.future import (
        Raised as Raised,
    )
    from offload.client.future import (
        Success as Success,
    )
    from offload.client.future import (
        Working as Working,
    )
    from offload.client.future import (
        as_completed as as_completed,
    )
    from offload.client.pool import Pool as Pool
    from offload.client.pool import PoolStats as PoolStats
    from offload.client.worker import Worker as Worker
    from offload.client.worker import connect as connect
    from offload.client.worker import delegate as delegate
    from offload.client.worker import spawn as spawn
    from offload.errors import (
        AuthenticationError as AuthenticationError,
    )
    from offload.errors import (
        ConnectionLost as ConnectionLost,
    )
    from offload.errors import (
        ExecutionError as ExecutionError,
    )
    from offload.errors import (
        LockTimeout as LockTimeout,
    )
    from offload.errors import (
        NoWorkerAvailable as NoWorkerAvailable,
    )
    from offload.errors import (
        OffloadError as OffloadError,
    )
    from offload.errors import (
        ProtocolError as ProtocolError,
    )
    from offload.errors import (
        RemoteError as RemoteError,
    )
    from offload.errors import (
        RemoteTraceback as RemoteTraceback,
    )
    from offload.errors import (
        SerializationError as SerializationError,
    )
    from offload.errors import (
        StartError as StartError,
    )
    from offload.errors import (
        TaskTimeout as TaskTimeout,
    )
    from offload.errors import (
        VersionMismatch as VersionMismatch,
    )
    from offload.errors import (
        WorkerCrashed as WorkerCrashed,
    )
    from offload.errors import (
        WorkerKilled as WorkerKilled,
    )
    from offload.lock import Lock as Lock
    from offload.program import init as init
    from offload.tasks import Task as Task
    from offload.tasks import task as task
    from offload.transport.net import TLS as TLS
    from offload.transport.ssh import SSH as SSH
    from offload.worker.execution import report as report

_EXPORTS = {
    "Actor": "offload.actor",
    "ActorHandle": "offload.actor",
    "Future": "offload.client.future",
    "Working": "offload.client.future",
    "Success": "offload.client.future",
    "Raised": "offload.client.future",
    "Failed": "offload.client.future",
    "Cancelled": "offload.client.future",
    "as_completed": "offload.client.future",
    "Worker": "offload.client.worker",
    "Pool": "offload.client.pool",
    "PoolStats": "offload.client.pool",
    "spawn": "offload.client.worker",
    "delegate": "offload.client.worker",
    "connect": "offload.client.worker",
    "TLS": "offload.transport.net",
    "SSH": "offload.transport.ssh",
    "init": "offload.program",
    "Lock": "offload.lock",
    "Task": "offload.tasks",
    "task": "offload.tasks",
    "report": "offload.worker.execution",
    **{
        name: "offload.errors"
        for name in (
            "AuthenticationError",
            "ConnectionLost",
            "ExecutionError",
            "LockTimeout",
            "NoWorkerAvailable",
            "OffloadError",
            "ProtocolError",
            "RemoteError",
            "RemoteTraceback",
            "SerializationError",
            "StartError",
            "TaskTimeout",
            "VersionMismatch",
            "WorkerCrashed",
            "WorkerKilled",
        )
    },
}

__all__ = [
    "SSH",
    "TLS",
    "Actor",
    "ActorHandle",
    "AuthenticationError",
    "Cancelled",
    "ConnectionLost",
    "ExecutionError",
    "Failed",
    "Future",
    "Lock",
    "LockTimeout",
    "NoWorkerAvailable",
    "OffloadError",
    "Pool",
    "PoolStats",
    "ProtocolError",
    "Raised",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "StartError",
    "Success",
    "Task",
    "TaskTimeout",
    "VersionMismatch",
    "Worker",
    "WorkerCrashed",
    "WorkerKilled",
    "Working",
    "__version__",
    "as_completed",
    "connect",
    "delegate",
    "init",
    "report",
    "spawn",
    "task",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'offload' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
