"""Every ```python block of the user guide (``docs/**/*.md``) runs as written.

Each block runs on its own, as a script in a fresh interpreter, in an empty temporary
directory, with a time limit; it passes when it exits with status 0 and leaves no process
behind. The block runs under a small runner that makes itself a child subreaper
(``PR_SET_CHILD_SUBREAPER``), so whatever the block started and did not stop is re-parented
to the runner instead of vanishing into init: the runner waits a bounded time for those
processes to exit (workers exit soon after their parent), then kills them and reports them.

What a page can say about a block, in an HTML comment on the line before it (a comment
this file does not know fails the test, so nothing is skipped by a typo):

* ``<!-- requires: server -->``: an ``offload serve`` is started on 127.0.0.1 for the
  block; its address is in the environment variable ``SERVER_ADDRESS`` and its token
  file in ``OFFLOAD_TOKEN_FILE`` (which offload itself reads).
* ``<!-- requires: ssh -->``: a real ``sshd`` is started on 127.0.0.1 for the block
  (``tests/sshd.py``: a free port, generated keys), and the host names in ``SSH_HOSTS``
  (``gpu1``, ``h1``, ...) lead to it, so the block says plain ``offload.SSH("gpu1")``.
  offload runs ``ssh`` from ``PATH``: the block's ``PATH`` starts with a directory whose
  ``ssh`` runs the real one with ``-F`` and a client configuration written for the test:
  a ``Host`` entry for those names with ``User`` (the current user), the client key, a
  known-hosts file with that sshd's key (``HostKeyAlias``), ``StrictHostKeyChecking yes``
  and ``BatchMode yes``, and no ``Port``: a ``ProxyCommand`` (a relay run by this
  interpreter) connects to the sshd's port whatever port the block asks for (a block may
  say ``port=2222``, which offload passes as ``-p``). On the
  "remote" side, sshd's ``SetEnv`` makes ``HOME`` a directory of the test (no login
  script of the real user runs; the remote cache is there too) and puts first on
  ``PATH`` a ``python3`` that runs the interpreter running the tests (the remote Python
  must be the same major.minor). The test fails if a session process of that sshd is
  left when the block ended; it is skipped, saying why, only where sshd or ssh is not
  installed.

Blocks that are not meant to run use another fence language (``sh``, ``text``, ``ini``,
``pycon``). Shell lines that run ``offload serve``/``ping``/``status`` are checked too:
every ``--option`` they use must be one the command accepts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from remote_helpers import ServerProcess, clean_env, die_with_parent, write_token_file
from sshd import MISSING, SSHD, have_sshd, make_keys, python_wrapper

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK_TIMEOUT = 45.0  # seconds one block may run
LEFTOVER_GRACE = 5.0  # seconds the block's processes get to exit after it ended
# pytest-timeout's limit for one test: the block, the grace, the runner and a server.
TEST_TIMEOUT = BLOCK_TIMEOUT + LEFTOVER_GRACE + 40

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*(\w[\w-]*)\s*:\s*(.*?)\s*-->\s*$")
KNOWN_REQUIREMENTS = {"server", "ssh"}


@dataclass(frozen=True)
class Block:
    """One ```python block: where it is, its code, and what it needs."""

    page: str
    line: int
    code: str
    requires: frozenset[str]

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def python_blocks(root: Path = DOCS) -> list[Block]:
    """Every ```python block of the pages under ``root``, with its ``requires`` comment."""
    blocks = []
    for path in sorted(root.rglob("*.md")):
        text = path.read_text()
        for match in _FENCE.finditer(text):
            if match.group(1).strip() != "python":
                continue
            start = text.count("\n", 0, match.start())
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            requires: set[str] = set()
            directive = _DIRECTIVE.match(before.strip())
            if directive:
                key, value = directive.groups()
                if key != "requires" or value not in KNOWN_REQUIREMENTS:
                    raise ValueError(f"{path}:{start}: unknown directive {before.strip()!r}")
                requires.add(value)
            blocks.append(
                Block(
                    page=str(path.relative_to(root)),
                    line=start + 2,  # the block's first line of code, 1-based
                    code=match.group(2),
                    requires=frozenset(requires),
                )
            )
    return blocks


BLOCKS = python_blocks() if DOCS.is_dir() else []
LOCAL = [b for b in BLOCKS if not b.requires]
WITH_SERVER = [b for b in BLOCKS if "server" in b.requires]
WITH_SSH = [b for b in BLOCKS if "ssh" in b.requires]

# Runs one block as a child, as a child subreaper; writes what happened as JSON.
RUNNER = r"""
import ctypes, json, os, signal, subprocess, sys, time
import psutil

PR_SET_CHILD_SUBREAPER = 36
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
script, report, limit, grace = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
proc = subprocess.Popen([sys.executable, script])
timed_out = False
try:
    status = proc.wait(limit)
except subprocess.TimeoutExpired:
    timed_out = True
    proc.kill()
    status = proc.wait()


def descendants():
    while True:  # reap whatever was re-parented to us and has exited
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in kids if p.status() != psutil.STATUS_ZOMBIE]


deadline = time.monotonic() + (0 if timed_out else grace)
left = descendants()
while left and time.monotonic() < deadline:
    time.sleep(0.02)
    left = descendants()
described = []
for p in left:
    try:
        described.append(f"pid {p.pid}: {' '.join(p.cmdline()) or p.name()}")
        p.kill()
    except psutil.Error:
        pass
end = time.monotonic() + 5
while descendants() and time.monotonic() < end:
    time.sleep(0.02)
with open(report, "w") as f:
    json.dump({"status": status, "timed_out": timed_out, "left_behind": described}, f)
"""


def run_block(
    block: Block, workdir: Path, env: dict[str, str], limit: float = BLOCK_TIMEOUT
) -> None:
    """Run ``block`` in ``workdir``; fail the test unless it exits 0 within ``limit``
    seconds and leaves no process behind."""
    script = workdir / "example.py"
    script.write_text(block.code)
    report = workdir / "report.json"
    out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
    limits = (str(limit), str(LEFTOVER_GRACE))
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        runner = subprocess.Popen(
            [sys.executable, "-c", RUNNER, str(script), str(report), *limits],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - it only calls prctl()
        )
        try:
            runner.wait(limit + LEFTOVER_GRACE + 20)
        except subprocess.TimeoutExpired:
            runner.send_signal(signal.SIGKILL)
            runner.wait()
            pytest.fail(f"{block.id}: the example's runner hung", pytrace=False)
    output = (
        f"--- stdout ---\n{out_path.read_text(errors='replace')}"
        f"--- stderr ---\n{err_path.read_text(errors='replace')}"
    )
    assert runner.returncode == 0, f"{block.id}: the runner failed\n{output}"
    result = json.loads(report.read_text())
    assert not result["timed_out"], f"{block.id}: ran over {limit:g} s\n{output}"
    assert result["status"] == 0, f"{block.id}: exited with {result['status']}\n{output}"
    assert not result["left_behind"], (
        f"{block.id}: left processes behind: {result['left_behind']}\n{output}"
    )


def block_env(**extra: str) -> dict[str, str]:
    """The environment a block runs in: the test's, without offload's variables."""
    env = clean_env(**extra)
    env.pop("PYTHONPATH", None)  # blocks use the installed offload, as a reader would
    return env


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("block", LOCAL, ids=[b.id for b in LOCAL])
def test_example_runs(block: Block, tmp_path: Path) -> None:
    run_block(block, tmp_path, block_env())


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize("block", WITH_SERVER, ids=[b.id for b in WITH_SERVER])
def test_example_with_a_server_runs(block: Block, tmp_path: Path) -> None:
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    token_file, _ = write_token_file(server_dir)
    server = ServerProcess(server_dir, ["--listen", "127.0.0.1:0", "--token-file", str(token_file)])
    server.start()
    try:
        env = block_env(SERVER_ADDRESS=server.address, OFFLOAD_TOKEN_FILE=str(token_file))
        work = tmp_path / "work"
        work.mkdir()
        run_block(block, work, env)
    finally:
        status = server.stop()
    assert status == 0, f"offload serve exited with {status}\n{server.output()}"


# The host names the ssh examples may use; each leads to the test's sshd.
SSH_HOSTS = ("gpu1", "gpu2", "h1", "h2")
SSH_TEST_TIMEOUT = TEST_TIMEOUT + 40  # plus an sshd's start and its sessions' end
# The ProxyCommand of those hosts: copies bytes between ssh and the sshd's port.
SSH_RELAY = r"""
import os, select, socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sending = True
while True:
    ready, _, _ = select.select([0, sock] if sending else [sock], [], [])
    if 0 in ready:
        data = os.read(0, 65536)
        if data:
            sock.sendall(data)
        else:
            sock.shutdown(socket.SHUT_WR)
            sending = False
    if sock in ready:
        data = sock.recv(65536)
        if not data:
            break
        view = memoryview(data)
        while view:
            view = view[os.write(1, view) :]
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def ssh_setup(tmp_path: Path, server: SSHD, keys: Path) -> dict[str, str]:
    """The block's environment for ``server`` (started): its ``PATH`` starts with an
    ``ssh`` that reads a configuration where ``SSH_HOSTS`` lead to ``server``."""
    real_ssh = shutil.which("ssh")
    assert real_ssh is not None
    alias = "offload-docs-sshd"
    kind, key = (keys / "host_key.pub").read_text().split()[:2]
    known_hosts = tmp_path / "ssh_known_hosts"
    known_hosts.write_text(f"{alias} {kind} {key}\n")
    relay = tmp_path / "ssh_relay.py"
    relay.write_text(SSH_RELAY)
    config = tmp_path / "ssh_config"
    config.write_text(
        "\n".join(
            [
                f"Host {' '.join(SSH_HOSTS)}",
                "    HostName 127.0.0.1",
                f"    ProxyCommand {shlex.quote(sys.executable)} -I {relay} {server.port}",
                f"    HostKeyAlias {alias}",
                f"    User {server.user}",
                f"    IdentityFile {keys / 'client_key'}",
                "    IdentitiesOnly yes",
                f"    UserKnownHostsFile {known_hosts}",
                "    GlobalKnownHostsFile /dev/null",
                "    StrictHostKeyChecking yes",
                "    BatchMode yes",
                "    LogLevel ERROR",
                "",
            ]
        )
    )
    client_bin = tmp_path / "client-bin"
    client_bin.mkdir()
    _executable(
        client_bin / "ssh",
        f'#!/bin/sh\nexec {shlex.quote(real_ssh)} -F {shlex.quote(str(config))} "$@"\n',
    )
    return block_env(PATH=f"{client_bin}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.timeout(SSH_TEST_TIMEOUT)
@pytest.mark.skipif(not have_sshd(), reason=MISSING)
@pytest.mark.parametrize("block", WITH_SSH, ids=[b.id for b in WITH_SSH])
def test_example_over_ssh_runs(block: Block, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    make_keys(keys)
    home = tmp_path / "remote-home"  # the remote side's HOME (its ~/.cache/offload too)
    (home / "bin").mkdir(parents=True)
    python_wrapper(home / "bin" / "python3", home / ".cache")
    remote_path = os.pathsep.join([str(home / "bin"), "/usr/local/bin", "/usr/bin", "/bin"])
    server = SSHD(keys, tmp_path, extra_config=[f"SetEnv PATH={remote_path} HOME={home}"])
    server.start()
    try:
        env = ssh_setup(tmp_path, server, keys)
        work = tmp_path / "work"
        work.mkdir()
        run_block(block, work, env)
    finally:
        left = server.stop()
    assert not left, f"{block.id}: processes left behind on the ssh side: {left}"


def test_the_guide_has_examples_on_every_page_that_should() -> None:
    """The harness finds the blocks (a changed fence syntax would silently find none)."""
    pages = {b.page for b in BLOCKS}
    for page in (
        "actors.md",
        "getting-started.md",
        "start-methods.md",
        "errors.md",
        "pools.md",
        "remote.md",
        "migrating.md",
    ):
        assert page in pages, f"docs/{page} has no ```python block the tests run"
    assert WITH_SERVER, "no example runs against a server"
    assert "ssh.md" in {b.page for b in WITH_SSH}, "docs/ssh.md has no example run over ssh"


def test_every_public_name_is_in_the_api_reference() -> None:
    """A name added to ``offload.__all__`` gets a place in docs/reference/."""
    import offload

    reference = "\n".join(p.read_text() for p in sorted((DOCS / "reference").glob("*.md")))
    missing = [
        name
        for name in offload.__all__
        if name != "__version__" and not re.search(rf"\b{re.escape(name)}\b", reference)
    ]
    assert not missing, f"public names missing from docs/reference/*.md: {missing}"


def test_unknown_directives_are_refused(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- requires: gpu -->\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match="unknown directive"):
        python_blocks(tmp_path)
    page.write_text("<!-- requires: server -->\n```python\nprint(1)\n```\n```sh\nls\n```\n")
    [block] = python_blocks(tmp_path)
    assert block.requires == {"server"} and block.code == "print(1)\n" and block.line == 3
    page.write_text("text\n<!-- requires: ssh -->\n```python\nprint(2)\n```\n")
    [block] = python_blocks(tmp_path)
    assert block.requires == {"ssh"} and block.code == "print(2)\n" and block.line == 4


def test_the_runner_catches_a_block_that_leaves_a_process_behind(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
    )
    block = Block(page="self-test.md", line=1, code=code, requires=frozenset())
    with pytest.raises(AssertionError, match=r"left processes behind: \['pid \d+: "):
        run_block(block, tmp_path, block_env())


def test_the_runner_stops_a_block_that_runs_too_long(tmp_path: Path) -> None:
    code = "import offload, time\nw = offload.spawn()\ntime.sleep(60)\n"
    block = Block(page="self-test.md", line=1, code=code, requires=frozenset())
    with pytest.raises(AssertionError, match="ran over 3 s"):
        run_block(block, tmp_path, block_env(), limit=3)


# A command line that runs offload: an optional "$ " prompt, sudo, and a path to the script.
_CLI_LINE = re.compile(
    r"^\s*(?:\$\s+)?(?:sudo\s+(?:-u\s+\S+\s+)?)?(?:\S*/)?offload (serve|ping|status)\b(.*)$"
)


def cli_uses() -> dict[str, set[str]]:
    """The ``--options`` that shell and unit-file blocks pass to each offload command.

    A line that ends in ``\\`` continues on the next line."""
    uses: dict[str, set[str]] = {}
    for path in sorted(DOCS.rglob("*.md")):
        for match in _FENCE.finditer(path.read_text()):
            if match.group(1).strip() == "python":
                continue
            text = match.group(2).replace("\\\n", " ")
            for line in text.splitlines():
                found = _CLI_LINE.match(line.split("#", 1)[0].replace("ExecStart=", ""))
                if found:
                    command, rest = found.groups()
                    uses.setdefault(command, set()).update(re.findall(r"--[a-z][a-z-]*", rest))
    return uses


def test_shell_examples_use_options_that_exist() -> None:
    uses = cli_uses()
    assert "serve" in uses, "no `offload serve` command line found in the guide"
    for command, options in sorted(uses.items()):
        helptext = subprocess.run(
            [sys.executable, "-m", "offload.cli", command, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        accepted = set(re.findall(r"--[a-z][a-z-]*", helptext))
        unknown = sorted(options - accepted)
        assert not unknown, f"`offload {command}` has no option {unknown} (docs use them)"
