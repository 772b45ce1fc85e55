"""Actor calls: a sequential method call on a warm actor, ``echo(1)``, against a pool
call of the same function to a pool of one worker (the target: an actor call costs no
more), through a handle that travelled (the actor's listener), and against Ray actors
where Ray is installed (the target: at most half Ray's round trip).

The contenders alternate in rounds, as in :mod:`benchmarks.roundtrip`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import offload
from benchmarks import require
from benchmarks.report import Row
from benchmarks.roundtrip import Contender, measure

POOL = "offload pool of 1: submit(echo, 1)"
ACTOR = "offload actor: a.echo(1)"
HOLDER = "offload actor, a holder's handle"
RAY = "Ray actor: a.echo.remote(1)"


def echo(value: Any) -> Any:
    return value


class Echo(offload.Actor):
    def echo(self, value: Any) -> Any:
        return value


class RayEcho:
    def echo(self, value: Any) -> Any:
        return value


def _pool() -> Contender:
    pool = offload.Pool(1)
    return Contender(POOL, lambda: pool.submit(echo, 1).result(), pool.shutdown)


def _actor() -> Contender:
    actor = Echo.spawn()
    return Contender(ACTOR, lambda: actor.echo(1).result(), lambda: actor.shutdown(timeout=5))


def _holder() -> Contender:
    import pickle

    actor = Echo.spawn()
    holder = pickle.loads(pickle.dumps(actor))

    def close() -> None:
        holder.close()
        actor.shutdown(timeout=5)

    return Contender(HOLDER, lambda: holder.echo(1).result(), close)


def _ray() -> Contender:
    ray: Any = require("ray")
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        ignore_reinit_error=True,
    )
    actor = ray.remote(RayEcho).remote()
    ray.get(actor.echo.remote(0))  # started

    def close() -> None:
        ray.kill(actor)
        ray.shutdown()

    return Contender(RAY, lambda: ray.get(actor.echo.remote(1)), close)


FACTORIES: list[tuple[str, Callable[[], Contender]]] = [
    (POOL, _pool),
    (ACTOR, _actor),
    (HOLDER, _holder),
    (RAY, _ray),
]


def run(calls: int, warmup: int, rounds: int) -> list[Row]:
    """``calls`` measured sequential calls per contender, after ``warmup``."""
    return measure(FACTORIES, calls, warmup, rounds)
