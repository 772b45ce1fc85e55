"""The bootstrap that runs first on a machine reached over ssh (standard library only).

offload sends this file's text over ssh's stdin to ``python -c`` there (see
:mod:`offload.client.ssh`), so it must not import offload, nor anything outside the
standard library, and it must be able to say "wrong Python" on any Python 3.

Theory of operation
-------------------
Everything arrives on stdin, written by the client at once (no round trip unless a
package is missing), and control lines go back on stdout, each starting with
``@offload:NONCE`` (a login script may print on stdout too: its lines are relayed):

1. A JSON line, the *request*: the client's Python version, the packages the remote
   side needs (offload itself, cloudpickle, those named in ``ship``) with the content
   hash of each, the token (hex: never in argv), the entry point to run, its settings,
   and the path of the Unix socket to listen on.
2. The Python versions must match (``error`` otherwise). Each package is usable as
   installed when the request says so (offload of the same version; cloudpickle of
   any), else from the cache directory ``$XDG_CACHE_HOME/offload`` or
   ``~/.cache/offload``, in a directory named by its hash. Those missing are asked
   for (``need KEY ...``); the client sends each as ``KEY SIZE\\n`` and SIZE bytes of a
   zlib-compressed file stream, which is checked against the hash, unpacked into a
   fresh directory beside its final place and renamed there: the rename is atomic, so
   two starts at once both succeed and neither sees half a copy.
3. The cache directories go in front of ``sys.path`` and ``PYTHONPATH`` (the worker
   processes the entry point starts inherit it), the directory of the socket is made
   (mode 0700, so only this user can connect), and a thread starts reading stdin.
4. The entry point ``module:function`` is called as ``function(listen, token,
   settings, ready)``; it listens on ``listen`` (``unix:PATH``) and calls
   ``ready(text)`` once clients may connect, which sends ``ready TEXT``.
5. End of file on stdin means the ssh connection is gone (without a pty, sshd sends no
   SIGHUP): the socket's directory is removed and the whole process group is killed.
   Worker processes, which lead their own process groups, die with their parent (their
   parent-death signal).
"""

import json
import os
import signal
import sys
import threading
import zlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# Set by main(): reading them at import would break a process without real stdio.
STDIN: "Any" = None
NONCE = ""
SOCKET_DIR = ""


def say(verb: str, text: str = "") -> None:
    """Send one control line to the client."""
    sys.stdout.write(f"\n@offload:{NONCE} {verb} {text}\n")
    sys.stdout.flush()


def fail(message: str) -> None:
    """Tell the client why the start failed, and end."""
    say("error", json.dumps(message))
    remove_socket_dir()
    sys.exit(1)


def cache_root() -> str:
    """``$XDG_CACHE_HOME/offload``, else ``~/.cache/offload``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "offload")


def installed(name: str, check: object) -> bool:
    """Whether ``name`` can be used as installed here (``check``: None never, "" if
    importable at all, a version if its ``_version.py`` says that version)."""
    if check is None:
        return False
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not check:
        return True
    path = os.path.join(os.path.dirname(spec.origin or ""), "_version.py")
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return False
    return f'"{check}"' in text or f"'{check}'" in text


def unpack(stream: bytes, target: str) -> None:
    """Write the files of a stream (``path\\nsize\\n`` and the bytes, again and
    again) under ``target``."""
    at = 0
    while at < len(stream):
        end = stream.index(b"\n", at)
        rel = stream[at:end].decode("utf-8")
        end2 = stream.index(b"\n", end + 1)
        size = int(stream[end + 1 : end2])
        data = stream[end2 + 1 : end2 + 1 + size]
        at = end2 + 1 + size
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts or "" in parts:
            fail(f"refusing to unpack the path {rel!r}")
        path = os.path.join(target, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def receive(key: str, expected_hash: str, root: str) -> None:
    """Read one package the client sends, check it, and put it in place atomically."""
    import hashlib
    import shutil
    import tempfile

    line = STDIN.readline().split()
    if len(line) != 2 or line[0].decode() != key:
        fail(f"the client sent {line!r} where the package {key} was expected")
    stream = zlib.decompress(STDIN.read(int(line[1])))
    if hashlib.sha256(stream).hexdigest()[: len(expected_hash)] != expected_hash:
        fail(f"the copy of {key} arrived damaged (its hash differs)")
    final = os.path.join(root, key)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root)
    try:
        unpack(stream, tmp)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not another start's copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_socket_dir() -> None:
    """Remove the socket's directory (made by main(); never one found there)."""
    if SOCKET_DIR:
        import shutil

        shutil.rmtree(SOCKET_DIR, ignore_errors=True)


def watch_stdin() -> None:
    """End everything when the ssh connection ends (end of file on stdin)."""
    try:
        while STDIN.read1(65536):
            pass
    except OSError:
        pass
    remove_socket_dir()
    try:
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
    finally:
        os._exit(1)


def main() -> None:
    """Steps 1 to 5 of the module documentation."""
    global STDIN, NONCE, SOCKET_DIR
    STDIN = sys.stdin.buffer
    request = json.loads(STDIN.readline().decode("utf-8"))
    NONCE = request["nonce"]
    want = tuple(request["python"])
    have = tuple(sys.version_info[:2])
    if have != want:
        fail(
            f"{sys.executable} runs Python {have[0]}.{have[1]}; the client runs "
            f"{want[0]}.{want[1]}, and both sides of offload must run the same major.minor "
            "(choose the interpreter with SSH(python=...))"
        )
    try:  # lead a process group of our own, so that one kill ends all of it
        os.setpgid(0, 0)
    except OSError:
        pass  # a session leader already (sshd started us with setsid)
    root = cache_root()
    paths = []
    missing = []
    for package in request["packages"]:
        if installed(package["name"], package["check"]):
            continue
        path = os.path.join(root, package["key"])
        if not os.path.isdir(path):
            missing.append(package)
        paths.append(path)
    if missing:
        say("need", " ".join(p["key"] for p in missing))
        for package in missing:
            try:
                receive(package["key"], package["hash"], root)
            except (OSError, ValueError, zlib.error) as exc:
                fail(f"could not write {package['key']} into {root}: {exc}")
    if paths:
        sys.path[:0] = paths
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    os.environ.update(request.get("env") or {})
    listen = request["socket"]
    SOCKET_DIR = os.path.dirname(listen)
    try:
        os.mkdir(SOCKET_DIR, 0o700)
    except OSError as exc:
        SOCKET_DIR = ""  # not ours: never remove it
        fail(f"cannot make the socket directory: {exc}")
    threading.Thread(target=watch_stdin, name="offload-ssh-stdin", daemon=True).start()
    module, _, function = request["entry"].partition(":")
    try:
        import importlib

        entry = getattr(importlib.import_module(module), function)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the start failed
        fail(f"{sys.executable} cannot load {request['entry']}: {type(exc).__name__}: {exc}")
    token = bytes.fromhex(request.pop("token"))
    try:
        code = entry(
            "unix:" + listen, token, request.get("settings") or {}, lambda text: say("ready", text)
        )
    finally:
        remove_socket_dir()
    # Not sys.exit: the interpreter's shutdown would race watch_stdin's thread, blocked
    # in a read of stdin ("Fatal Python error: could not acquire lock for stdin").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":  # exec'd by the loader as __main__; never when imported
    main()
