"""The control socket: a private Unix socket, one JSON request per connection, bounded."""

from __future__ import annotations

import json
import socket
import stat
from typing import TYPE_CHECKING, Any

import pytest
import trio

from proxy.net.control import ControlError, open_control_socket, request, serve_control

if TYPE_CHECKING:
    from pathlib import Path


async def answer(message: dict[str, Any]) -> dict[str, Any]:
    await trio.lowlevel.checkpoint()
    return {"echo": message}


def raw(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


async def test_requests_and_bad_requests(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.touch()
    with pytest.raises(ControlError, match="is not a socket"):
        open_control_socket(path)  # never replaces a file that is not a socket
    path.unlink()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket left behind by a process that died
    sock = open_control_socket(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    await nursery.start(serve_control, sock, answer)

    def client() -> list[object]:
        return [
            request(path, {"command": "status"}),
            raw(path, b"not json\n"),
            raw(path, b"[1, 2]\n"),
            raw(path, b"x" * 5000),
            raw(path, b""),
        ]

    ok, not_json, not_object, too_long, nothing = await trio.to_thread.run_sync(client)
    assert ok == {"echo": {"command": "status"}}
    assert json.loads(not_json) == {"error": "not a JSON object"}  # type: ignore[arg-type]
    assert json.loads(not_object) == {"error": "not a JSON object"}  # type: ignore[arg-type]
    assert json.loads(too_long) == {"error": "request too long"}  # type: ignore[arg-type]
    assert nothing == b""


def test_request_says_why_nothing_answers(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="does not exist: is serve running"):
        request(tmp_path / "none.sock", {})
    path = tmp_path / "dead.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    with pytest.raises(ControlError, match="nothing listens"):
        request(path, {})
    with pytest.raises(ControlError):
        request(tmp_path, {})  # a directory


async def test_a_client_that_answers_nothing_gets_no_answer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "c.sock"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(path))
    silent.listen()
    try:

        def client() -> None:
            with pytest.raises(ControlError):
                request(path, {"command": "status"}, timeout=0.5)

        # The server accepts (backlog) but never answers: the client's deadline ends it.
        await trio.to_thread.run_sync(client)
    finally:
        silent.close()
