"""conftest.py does what it claims: the ``no_leaks`` fixture catches leaks (and lets
``long_lived`` processes be), every test is in exactly one tier, and the ``unit`` tier's
guard catches a unit test that starts a process or opens a socket.

Most tests run an inner pytest session (in this process) whose conftest is the real
one, with a test that misbehaves on purpose, and check that the inner run reports it
and that nothing is left behind afterwards. The tier check collects the real test
suite in a separate pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import types
from collections import Counter
from pathlib import Path

import psutil
import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
TESTS_DIR = CONFTEST.parent


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


def test_a_long_lived_process_and_its_descendants_are_no_leak(
    inner: pytest.Pytester, stash: types.SimpleNamespace
) -> None:
    """A module fixture's process, declared with ``long_lived``, starts a child while a
    test runs: neither is that test's leak. The fixture stops both at its teardown."""
    inner.makepyfile(
        """
        import subprocess
        import sys

        import pytest

        import _leak_stash

        # Starts a child when told to, prints its pid; ends (and waits for the child)
        # when its stdin closes.
        SERVER = (
            "import subprocess, sys\\n"
            "sys.stdin.readline()\\n"
            "kid = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'],"
            " stdin=subprocess.PIPE)\\n"
            "print(kid.pid, flush=True)\\n"
            "sys.stdin.read()\\n"
            "kid.stdin.close()\\n"
            "kid.wait()\\n"
        )


        @pytest.fixture(scope="module")
        def server(long_lived):
            proc = subprocess.Popen(
                [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            _leak_stash.procs.append(proc)
            with long_lived(proc.pid):
                yield proc
            proc.stdin.close()
            proc.wait(timeout=10)
            proc.stdout.close()


        @pytest.mark.leak_grace(0.2)
        def test_server_starts_a_child(server):
            server.stdin.write(b"go\\n")
            server.stdin.flush()
            _leak_stash.procs.append(int(server.stdout.readline()))
        """
    )
    result = inner.runpytest_inprocess()

    result.assert_outcomes(passed=1)
    proc, kid = stash.procs
    assert isinstance(proc, subprocess.Popen)
    assert proc.returncode == 0
    assert kid not in {p.pid for p in psutil.Process().children(recursive=True)}


def test_a_unit_test_that_starts_a_process_or_opens_a_socket_fails(
    inner: pytest.Pytester,
) -> None:
    inner.makepyfile(
        """
        import socket
        import subprocess
        import sys

        import pytest


        @pytest.mark.unit
        def test_starts_a_process():
            subprocess.run([sys.executable, "-c", "pass"], check=True)


        @pytest.mark.unit
        def test_opens_a_socket():
            a, b = socket.socketpair()
            a.close()
            b.close()


        @pytest.mark.unit
        def test_pure():
            assert sum(range(4)) == 6


        def test_not_unit_may_start_a_process():
            subprocess.run([sys.executable, "-c", "pass"], check=True)
        """
    )
    result = inner.runpytest_inprocess()

    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*a unit test must start no process and open no socket*",
            "*subprocess.Popen*",
            "*a unit test must start no process and open no socket*",
            "*socket.__new__*",
        ]
    )


# Loaded into a pytest that only collects the real suite: dumps each test's tier markers.
TIER_DUMP_PLUGIN = """
import json
import os


def pytest_collection_finish(session):
    [conftest] = [
        p for p in session.config.pluginmanager.get_plugins() if hasattr(p, "TIER_OF_FILE")
    ]
    tiers = set(conftest.TIERS)
    items = [
        {
            "nodeid": item.nodeid,
            "key": item.path.name + "::" + getattr(item, "originalname", item.name),
            "tiers": sorted({m.name for m in item.iter_markers() if m.name in tiers}),
        }
        for item in session.items
    ]
    with open(os.environ["TIER_DUMP"], "w") as f:
        json.dump({"tiers": sorted(tiers), "table": conftest.TIER_OF_FILE, "items": items}, f)
"""


@pytest.mark.timeout(300)
def test_every_test_is_in_exactly_one_tier(tmp_path: Path) -> None:
    (tmp_path / "tier_dump.py").write_text(TIER_DUMP_PLUGIN)
    dump = tmp_path / "tiers.json"
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"),
            *("-p", "tier_dump", str(TESTS_DIR)),
        ],
        cwd=TESTS_DIR.parent,
        env={**os.environ, "TIER_DUMP": str(dump), "PYTHONPATH": pythonpath},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"collection failed:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
    data = json.loads(dump.read_text())
    items = data["items"]
    assert len(items) > 500, len(items)

    wrong = [f"{i['nodeid']}: {i['tiers']}" for i in items if len(i["tiers"]) != 1]
    assert not wrong, "tests not in exactly one tier:\n" + "\n".join(wrong[:50])
    per_tier = Counter(i["tiers"][0] for i in items)
    assert set(per_tier) == set(data["tiers"]) == {"unit", "process", "network"}, per_tier

    # The table names only files and tests that exist.
    files = {i["key"].split("::")[0] for i in items}
    keys = {i["key"] for i in items}
    stale = [key for key in data["table"] if key not in (keys if "::" in key else files)]
    assert not stale, f"conftest.TIER_OF_FILE names what does not exist: {stale}"

    # The contract suite: its remote worker kind is network, the start methods process.
    contract = [i for i in items if i["nodeid"].startswith("tests/test_contract.py::")]
    remote = [i for i in contract if "[remote" in i["nodeid"]]
    assert remote
    assert all(i["tiers"] == ["network"] for i in remote)
    assert all(i["tiers"] == ["process"] for i in contract if i not in remote)
