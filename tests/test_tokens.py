"""Unit tests for :mod:`offload.tokens`: where each side's token comes from (no
processes, no sockets; the end-to-end cases are in ``test_server_hardening.py``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from offload import tokens
from offload.errors import AuthenticationError
from offload.transport.net import parse_address

TOKEN = b"t" * 40


@pytest.fixture(autouse=True)
def no_token_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tokens.TOKEN_ENV, raising=False)
    monkeypatch.delenv(tokens.TOKEN_FILE_ENV, raising=False)


def token_file(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_the_client_takes_the_argument_then_the_variable_then_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(AuthenticationError, match="no token"):
        tokens.resolve_token(None)
    monkeypatch.setenv(tokens.TOKEN_FILE_ENV, token_file(tmp_path / "t", b"f" * 40 + b"\n"))
    assert tokens.resolve_token(None) == b"f" * 40  # the file's newline does not count
    monkeypatch.setenv(tokens.TOKEN_ENV, "e" * 40)
    assert tokens.resolve_token(None) == b"e" * 40
    assert tokens.resolve_token(TOKEN) == TOKEN
    with pytest.raises(AuthenticationError):
        tokens.resolve_token(b"short")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o602])
def test_a_token_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = token_file(tmp_path / "token", TOKEN, mode)
    with pytest.raises(AuthenticationError, match=re.escape(f"chmod 600 {path}")):
        tokens.read_token_file(path)


def test_the_server_reads_its_file_or_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = parse_address("192.0.2.1:8765")
    assert tokens.server_token(remote, token_file(tmp_path / "t", TOKEN)) == TOKEN
    monkeypatch.setenv(tokens.TOKEN_ENV, "e" * 40)
    assert tokens.server_token(remote, None) == b"e" * 40


def test_the_server_refuses_the_network_without_a_token() -> None:
    with pytest.raises(
        ValueError, match=re.escape("refusing to listen on 192.0.2.1:8765 without a token")
    ):
        tokens.server_token(parse_address("192.0.2.1:8765"), None)


def test_a_generated_token_is_private_and_removed(capsys: pytest.CaptureFixture[str]) -> None:
    token = tokens.server_token(parse_address("127.0.0.1:0"), None)
    path = Path(capsys.readouterr().err.split("wrote a new one to ")[1].split(" ")[0])
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.parent.stat().st_mode & 0o777 == 0o700
        assert tokens.read_token_file(str(path)) == token
    finally:
        tokens.remove_generated_tokens()
    assert not path.parent.exists()
    tokens.remove_generated_tokens()  # idempotent
