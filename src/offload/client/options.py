"""Worker options (SPEC section 4), validated once, shared by spawn, Pool and delegate."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

START_METHODS = ("spawn", "forkserver", "fork", "reexec")
STDIO_MODES = ("inherit", "devnull", "prefix")
SHUTDOWN_ON = ("parent_exit", "heartbeat_timeout", "explicit")

_names = itertools.count(1)


def next_worker_name() -> str:
    """``offload-worker-N``, N counting up in this process."""
    return f"offload-worker-{next(_names)}"


@dataclass(frozen=True)
class WorkerOptions:
    """Every option a local worker takes; see :func:`offload.spawn`."""

    name: str | None = None
    start_method: str = "spawn"
    python: str = field(default_factory=lambda: sys.executable)
    preload: tuple[str, ...] = ()
    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    umask: int | None = None
    stdout: str = "inherit"
    stderr: str = "inherit"
    concurrency: int = 1
    max_tasks: int | None = None
    memory_limit: int | None = None
    start_timeout: float = 30.0
    heartbeat: tuple[float, float] | None = None
    max_message_size: int = 1 << 30
    on_failure: Callable[[BaseException], Any] | None = None
    shutdown_on: str = "parent_exit"
    where: Any = None

    def __post_init__(self) -> None:
        if self.start_method not in START_METHODS:
            raise ValueError(
                f"start_method must be one of {', '.join(START_METHODS)}; got {self.start_method!r}"
            )
        for stream in ("stdout", "stderr"):
            mode = getattr(self, stream)
            if not isinstance(mode, (str, os.PathLike)):
                raise TypeError(f"{stream} must be 'inherit', 'devnull', 'prefix' or a path")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ValueError(f"max_tasks must be >= 1, got {self.max_tasks}")
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise ValueError("memory_limit must be a positive number of bytes")
        if self.start_timeout <= 0:
            raise ValueError(f"start_timeout must be positive, got {self.start_timeout}")
        if self.max_message_size < 1024:
            raise ValueError(f"max_message_size must be >= 1024, got {self.max_message_size}")
        if self.heartbeat is not None:
            interval, timeout = self.heartbeat
            if not 0 < interval < timeout:
                raise ValueError(
                    "heartbeat must be (interval, timeout) with 0 < interval < timeout"
                )
        if self.shutdown_on not in SHUTDOWN_ON:
            raise ValueError(f"shutdown_on must be one of {', '.join(SHUTDOWN_ON)}")
        if self.shutdown_on == "explicit":
            raise ValueError(
                "shutdown_on='explicit' needs a worker that others can reach by address "
                "after its creator is gone (served actor handles, SPEC section 8), which "
                "this release does not have; use 'parent_exit' or 'heartbeat_timeout'"
            )
        if self.shutdown_on == "heartbeat_timeout" and self.heartbeat is None:
            raise ValueError("shutdown_on='heartbeat_timeout' needs heartbeat=(interval, timeout)")
        if self.env is not None:
            for key, value in self.env.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError(f"env must map str to str; got {key!r}: {value!r}")
        if self.initializer is not None and not callable(self.initializer):
            raise TypeError("initializer must be callable")
        if self.where is not None and not isinstance(self.where, str):
            raise ValueError(
                f"where={self.where!r}: give a worker server's address as 'host:port', "
                "'[v6]:port' or 'unix:PATH' (starting workers over ssh is not supported yet)"
            )

    def with_name(self, name: str | None) -> WorkerOptions:
        """A copy with ``name`` set (or a fresh default name)."""
        return replace(self, name=name or next_worker_name())


def make_options(**kwargs: Any) -> WorkerOptions:
    """Build :class:`WorkerOptions` from keyword arguments, with clear errors."""
    unknown = set(kwargs) - set(WorkerOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown worker option(s): {', '.join(sorted(unknown))}")
    if "preload" in kwargs:
        preload = kwargs["preload"]
        kwargs["preload"] = (preload,) if isinstance(preload, str) else tuple(preload)
    if "initargs" in kwargs:
        kwargs["initargs"] = tuple(kwargs["initargs"])
    for stream in ("stdout", "stderr"):
        if isinstance(kwargs.get(stream), os.PathLike):
            kwargs[stream] = os.fspath(kwargs[stream])
    if kwargs.get("heartbeat") is not None:
        kwargs["heartbeat"] = tuple(kwargs["heartbeat"])
    return WorkerOptions(**kwargs)


def settings_for_worker(options: WorkerOptions) -> dict[str, Any]:
    """The JSON-able settings a worker process reads at start-up."""
    return {
        "concurrency": options.concurrency,
        "max_message_size": options.max_message_size,
        "preload": list(options.preload),
        "heartbeat": list(options.heartbeat) if options.heartbeat else None,
        "shutdown_on": options.shutdown_on,
    }


def env_for_worker(options: WorkerOptions) -> dict[str, str]:
    """Extra environment variables for the worker (extends the parent's)."""
    env = dict(options.env or {})
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("env must map str to str")
    return env
