"""What a fresh program imports: ``import offload``, then a first local pool.

Each test runs a fresh interpreter (the parent has imported everything long ago) and
reads its ``sys.modules``: a behaviour test of the lazy imports that keep a fresh
program's start fast, not a timing test (benchmarks/pool_coldstart.py times it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Needed only on some paths (asyncio: awaiting; ssl, json, hashlib: remote servers and
# ssh; cloudpickle: by-value functions; psutil: memory limits; concurrent.futures.process:
# never), each costing a fresh program milliseconds.
NOT_ON_IMPORT = (
    "asyncio",
    "ssl",
    "concurrent.futures.process",
    "cloudpickle",
    "psutil",
    "offload.server",
)
# A first local pool needs none of those either, nor dataclasses (with inspect, ast, dis),
# nor typing (import it under ``if TYPE_CHECKING:``, as the client's modules do), nor the
# remote and ssh sides of the client.
NOT_ON_FIRST_POOL = (
    *NOT_ON_IMPORT,
    "dataclasses",
    "inspect",
    "typing",
    "json",
    "hashlib",
    "offload.client.remote",
    "offload.client.ssh",
    "offload.transport.net",
    "offload.tasks",
    # The standard library's socket, queue, struct and heapq packages (offload uses
    # their C halves: the packages cost milliseconds of enums and re-exports), and mmap
    # and array, which only large data needs.
    "socket",
    "queue",
    "struct",
    "heapq",
    "mmap",
    "array",
)
# What a spawned worker must not import before it answers its first call, beyond what a
# bare interpreter has: a fresh program's pool of 2 starts two workers at once, so on 2
# cores each of their imports costs it about as much as one of its own. The worker has
# its own path (offload.worker, offload.protocol, the C halves of pickle and socket).
NOT_IN_A_SPAWNED_WORKER = (
    *NOT_ON_FIRST_POOL,
    "concurrent.futures",
    "logging",
    "threading",
    "subprocess",
    "selectors",
    "signal",
    "enum",
    "re",
    "weakref",
    "traceback",
    "warnings",
    "contextlib",
    "locale",
    "offload.client",
    "offload.process",
    "offload.transport.loop",
    "offload.transport.channel",
)


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has imported after running ``code``."""
    # sys.modules is read before json is imported to print it.
    script = (
        f"{code}\nimport sys\nloaded = sorted(sys.modules)\nimport json\nprint(json.dumps(loaded))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_offload_imports_none_of_the_heavy_modules() -> None:
    modules = _modules_after("import offload")
    assert "offload" in modules
    imported = sorted(m for m in NOT_ON_IMPORT if m in modules)
    assert not imported, f"import offload imported {imported}"


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_first_local_pool_imports_none_of_the_heavy_modules(start_method: str) -> None:
    if start_method == "fork" and not hasattr(__import__("os"), "fork"):
        pytest.skip("no os.fork() here")
    code = (
        "import offload\n"
        f"pool = offload.Pool(2, start_method={start_method!r})\n"
        "assert pool.submit(abs, -1).result(timeout=60) == 1\n"
        "pool.shutdown()"
    )
    modules = _modules_after(code)
    assert "offload.client.pool" in modules
    imported = sorted(m for m in NOT_ON_FIRST_POOL if m in modules)
    assert not imported, f"a first Pool(2) imported {imported}"


def test_every_public_name_still_imports_in_a_fresh_interpreter() -> None:
    # The lazy names resolve on first use: from-imports of every public name work.
    modules = _modules_after("import offload\nfor name in offload.__all__: getattr(offload, name)")
    assert "offload.client.status" in modules  # Success, PoolStats...: loaded when asked for


def test_a_spawned_worker_imports_none_of_the_heavy_modules() -> None:
    import offload

    bare = _modules_after("pass")
    with offload.Pool(1, start_method="spawn") as pool:
        # eval is a builtin: the task itself imports nothing into the worker.
        loaded = pool.submit(eval, "sorted(__import__('sys').modules)").result(timeout=60)
    added = set(loaded) - bare
    assert "offload.worker.loop" in added
    heavy = sorted(m for m in NOT_IN_A_SPAWNED_WORKER if m in added)
    client_side = sorted(m for m in added if m.startswith("offload.client."))
    assert not heavy, f"a spawned worker imported {heavy}"
    assert not client_side, f"a spawned worker imported the client side: {client_side}"
