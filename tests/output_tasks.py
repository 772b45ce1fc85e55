"""Tasks for the remote-output tests (not a test module): they print.

The tests start ``offload serve`` with ``PYTHONPATH`` including ``tests/``, so the
server's workers import this module by reference. A task that must be observed while it
runs writes a file (atomically: write, then rename); nothing here sleeps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import offload

if os.environ.get("OUTPUT_TASKS_ANNOUNCE"):  # preloaded by a server: printed outside any call
    print(f"output_tasks imported in {os.getpid()}", flush=True)


def numbered_lines(tag: str, count: int) -> int:
    """Print ``count`` numbered lines on stdout and on stderr, interleaved."""
    for i in range(count):
        print(f"{tag} out {i}")
        print(f"{tag} err {i}", file=sys.stderr)
    return count


def unfinished_line(text: str) -> str:
    """Print ``text`` on stdout with no newline at the end."""
    sys.stdout.write(text)
    return text


def write_stderr(text: str) -> None:
    """Write ``text`` to stderr (flushed when the call ends)."""
    sys.stderr.write(text)


def last_words_then_exit(text: str, code: int) -> None:
    """Write ``text`` to stderr at the file-descriptor level, then die at once."""
    os.write(2, text.encode())
    os._exit(code)


def flood(megabytes: int, done_path: str) -> int:
    """Write ``megabytes`` MiB to stdout, then create ``done_path``; the bytes written."""
    chunk = b"x" * 1023 + b"\n"
    out = sys.stdout.buffer
    for _ in range(megabytes * 1024):
        out.write(chunk)
    out.flush()
    tmp = done_path + ".tmp"
    Path(tmp).write_text("done")
    os.replace(tmp, done_path)
    return megabytes * 1024 * len(chunk)


def pid() -> int:
    return os.getpid()


class Printer(offload.Actor):
    """An actor that prints (its process's output reaches its creator)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def say(self, text: str) -> str:
        print(f"{self.tag} {text}")
        print(f"{self.tag} {text} on stderr", file=sys.stderr)
        return text

    def numbered(self, text: str, count: int) -> int:
        """Print ``count`` numbered lines on stdout (with ``sys.stdout.write``, then
        ``sys.stdout.buffer``) and on stderr."""
        for i in range(count):
            if i % 2:
                sys.stdout.buffer.write(f"{self.tag} {text} {i}\n".encode())
            else:
                sys.stdout.write(f"{self.tag} {text} {i}\n")
            print(f"{self.tag} {text} err {i}", file=sys.stderr)
        return count
