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
    from offload.client.channels import channel as channel
    from offload.client.future import (
        Future as Future,
    )
    from offload.client.future import (
        as_completed as as_completed,
    )
    from offload.client.pool import Pool as Pool
    from offload.client.status import (
        Cancelled as Cancelled,
    )
    from offload.client.status import (
        Failed as Failed,
    )
    from offload.client.status import PoolStats as PoolStats
    from offload.client.status import (
        Raised as Raised,
    )
    from offload.client.status import (
        Success as Success,
    )
    from offload.client.status import (
        Working as Working,
    )
    from offload.client.worker import Worker as Worker
    from offload.client.worker import connect as connect
    from offload.client.worker import delegate as delegate
    from offload.client.worker import spawn as spawn
    from offload.errors import (
        AuthenticationError as AuthenticationError,
    )
    from offload.errors import (
        ChannelClosed as ChannelClosed,
    )
    from offload.errors import (
        ChannelTimeout as ChannelTimeout,
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
    "Working": "offload.client.status",
    "Success": "offload.client.status",
    "Raised": "offload.client.status",
    "Failed": "offload.client.status",
    "Cancelled": "offload.client.status",
    "as_completed": "offload.client.future",
    "Worker": "offload.client.worker",
    "Pool": "offload.client.pool",
    "PoolStats": "offload.client.status",
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
    "channel": "offload.client.channels",
    **{
        name: "offload.errors"
        for name in (
            "AuthenticationError",
            "ChannelClosed",
            "ChannelTimeout",
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
    "ChannelClosed",
    "ChannelTimeout",
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
    "channel",
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
    import sys

    # __import__, not importlib.import_module: importlib is one more import for a fresh
    # program (and __import__ returns the top package: the module is in sys.modules).
    __import__(module)
    value = getattr(sys.modules[module], name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
