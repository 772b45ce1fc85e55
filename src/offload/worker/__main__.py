"""Entry point of a ``spawn`` worker: ``python -m offload.worker``."""

from offload.worker.loop import run_worker

run_worker()
