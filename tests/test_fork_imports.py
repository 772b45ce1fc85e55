"""A ``fork`` worker forked while another thread of the caller was importing a module.

The worker has only the thread that forked it: an import another thread had under way
left its module lock held by a thread that does not exist there, and the first call
that needs that module would wait on the lock forever (seen as a pool that hangs on its
first call of a ``__main__`` function: the caller was importing cloudpickle while the
I/O loop forked). The scenario runs in a fresh interpreter under a deadline, so a hang
fails this test only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

GATE = """
import threading
PARENT = 0
entered = threading.Event()  # the importing thread is inside slowmod's body
release = threading.Event()  # ... and may finish it
"""

SLOWMOD = """
import os
import gate
if os.getpid() == gate.PARENT:  # only the caller's import stalls, never a worker's
    gate.entered.set()
    gate.release.wait(30)
VALUE = 42
"""

SCENARIO = """
import importlib, json, os, sys, threading
sys.path.insert(0, sys.argv[1])
import gate
import offload

gate.PARENT = os.getpid()
importer = threading.Thread(target=importlib.import_module, args=("slowmod",))
importer.start()
assert gate.entered.wait(10), "the importing thread never got into slowmod"

def value_of_slowmod():  # in __main__: travels by value
    import slowmod
    return slowmod.VALUE

outcome = {}
with offload.Pool(1, start_method="fork") as pool:  # forks while slowmod is half-imported
    try:
        outcome["value"] = pool.submit(value_of_slowmod).result(timeout=15)
    except BaseException as exc:
        outcome["error"] = repr(exc)
        pool.shutdown(kill=True)
    gate.release.set()
    importer.join()
print(json.dumps(outcome))
"""


def test_a_fork_worker_imports_a_module_the_caller_was_importing_as_it_forked(
    tmp_path: Path,
) -> None:
    (tmp_path / "gate.py").write_text(textwrap.dedent(GATE))
    (tmp_path / "slowmod.py").write_text(textwrap.dedent(SLOWMOD))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", SCENARIO, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome == {"value": 42}, (outcome, proc.stderr[-3000:])
