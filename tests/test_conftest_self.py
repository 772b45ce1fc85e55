"""The ``no_leaks`` fixture in conftest.py catches what it claims to catch.

Each test runs an inner pytest session (in this process) whose conftest is the
real one, with a test that leaks on purpose, and checks that the inner run
reports the leak and that nothing is left behind afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import types
from pathlib import Path

import psutil
import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.fixture
def stash(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A module the inner test can import to hand its leaked objects back.

    pytester restores ``sys.modules`` after an in-process run, but only drops
    modules added during the run, so one added beforehand stays reachable.
    """
    module = types.SimpleNamespace(procs=[], events=[], threads=[])
    monkeypatch.setitem(sys.modules, "_leak_stash", module)  # type: ignore[arg-type]
    return module


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST.read_text())
    return pytester


def test_leaked_child_process_is_reported_and_killed(
    inner: pytest.Pytester, stash: types.SimpleNamespace
) -> None:
    inner.makepyfile(
        """
        import subprocess
        import sys

        import pytest

        import _leak_stash


        @pytest.mark.leak_grace(0.2)
        def test_leaks_a_child():
            proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            _leak_stash.procs.append(proc)
        """
    )
    result = inner.runpytest_inprocess()

    result.assert_outcomes(passed=1, errors=1)
    [proc] = stash.procs
    assert isinstance(proc, subprocess.Popen)
    result.stdout.fnmatch_lines(
        [
            "*resource leak after test:*",
            "*leaked child processes (killed):*",
            f"*pid {proc.pid}: *time.sleep(30)*",
        ]
    )
    # The fixture killed and reaped it; the Popen object just learns it is gone.
    proc.wait(timeout=5)
    assert proc.pid not in {p.pid for p in psutil.Process().children(recursive=True)}


def test_leaked_thread_is_reported(inner: pytest.Pytester, stash: types.SimpleNamespace) -> None:
    inner.makepyfile(
        """
        import threading

        import pytest

        import _leak_stash


        @pytest.mark.leak_grace(0.2)
        def test_leaks_a_thread():
            event = threading.Event()
            thread = threading.Thread(target=event.wait, name="leaky-thread", daemon=True)
            thread.start()
            _leak_stash.events.append(event)
            _leak_stash.threads.append(thread)
        """
    )
    try:
        result = inner.runpytest_inprocess()
    finally:
        # Release the inner test's thread only after its teardown check ran.
        for event in stash.events:
            event.set()
        for thread in stash.threads:
            thread.join(timeout=5)

    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*resource leak after test:*", "*leaked threads:*", "*leaky-thread (ident *"]
    )
    [thread] = stash.threads
    assert isinstance(thread, threading.Thread)
    assert not thread.is_alive()


def test_clean_test_passes(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import subprocess
        import sys
        import threading


        def test_cleans_up(python_exe):
            subprocess.run([python_exe, "-c", "pass"], check=True)
            thread = threading.Thread(target=lambda: None)
            thread.start()
            thread.join()
            with open(__file__) as f:
                f.read()
        """
    )
    result = inner.runpytest_inprocess()
    result.assert_outcomes(passed=1)
