"""Worker start over ssh: ``offload.spawn(where=offload.SSH(...))`` to its first result,
against a bare ``ssh host python -c pass`` in the same run.

The ssh server is a throw-away ``sshd`` on 127.0.0.1 with generated keys, the one the
tests use (``tests/sshd.py``, imported from the tests folder: one copy of it). Three
contenders, their repetitions interleaved (:func:`benchmarks.coldstart.measure`), each
after one untimed warm-up start:

* the floor: ``ssh`` running the remote interpreter with ``-c pass`` (the ssh handshake,
  the login, one interpreter start);
* offload with offload installed there (this virtualenv's interpreter);
* offload with nothing installed there (the base interpreter with ``-S``): the warm-up
  start copies offload and cloudpickle into the remote cache, the timed starts find it
  warm.

Those start a new ssh connection each, as the floor does. A fourth contender shows
what ssh's own multiplexing buys repeated starts: ``ssh_options`` with
``ControlMaster=auto`` and ``ControlPersist`` (the warm-up start leaves the master
connection; the timed ones open sessions over it; ``ssh -O exit`` ends it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks import ROOT, Skipped
from benchmarks.coldstart import measure
from benchmarks.report import Row

FLOOR = "bare ssh host python -c pass (floor)"
INSTALLED = "offload (installed there)"
ZERO_INSTALL = "offload (zero-install, warm cache)"
MULTIPLEXED = "offload, through a ControlMaster connection"


def _sshd_module() -> object:
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    import sshd

    if not sshd.have_sshd():
        raise Skipped("skipped (no /usr/sbin/sshd: apt-get install openssh-server)")
    return sshd


def run(reps: int) -> list[Row]:
    """Start sshd, measure, stop it."""
    try:
        sshd = _sshd_module()
    except Skipped as exc:
        return [Row(name, None, note=str(exc)) for name in (FLOOR, INSTALLED, ZERO_INSTALL)]
    import offload

    with tempfile.TemporaryDirectory(prefix="offload-bench-ssh-") as tmp:
        base = Path(tmp)
        (base / "keys").mkdir()
        sshd.make_keys(base / "keys")  # type: ignore[attr-defined]
        server = sshd.SSHD(base / "keys", base).start()  # type: ignore[attr-defined]
        try:
            installed = sshd.python_wrapper(base / "python", base / "cache")  # type: ignore[attr-defined]
            bare = sshd.python_wrapper(  # type: ignore[attr-defined]
                base / "python-bare", base / "cache", isolated=True
            )

            def floor() -> Callable[[], None]:
                subprocess.run(
                    server.ssh_argv(installed, "-c", "pass"),
                    check=True,
                    stdin=subprocess.DEVNULL,
                )
                return lambda: None

            def start(python: str) -> Callable[[], Callable[[], None]]:
                def go() -> Callable[[], None]:
                    w = offload.spawn(where=server.ssh(python=python))
                    w.call(abs, -1)
                    return lambda: w.shutdown(timeout=10)

                return go

            control = ("-o", f"ControlPath={base}/cm-%C")
            shared = (
                *server.ssh().ssh_options,
                *control,
                "-o",
                "ControlMaster=auto",
                "-o",
                "ControlPersist=60",
            )

            def multiplexed() -> Callable[[], None]:
                w = offload.spawn(where=server.ssh(python=installed, ssh_options=shared))
                w.call(abs, -1)
                return lambda: w.shutdown(timeout=10)

            return measure(
                [
                    (FLOOR, floor, "ssh handshake + one interpreter start"),
                    (INSTALLED, start(installed), "bootstrap + server + worker"),
                    (ZERO_INSTALL, start(bare), "as above, offload from the remote cache"),
                    (MULTIPLEXED, multiplexed, "no ssh handshake: a session on the master"),
                ],
                reps,
            )
        finally:
            subprocess.run(
                [*server.ssh_argv()[:-2], *control, "-O", "exit", "127.0.0.1"],
                check=False,
                capture_output=True,
            )
            server.stop()
