"""The control socket: a private Unix socket, one JSON request per connection, bounded."""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.net.control import ControlError, open_control_socket, request, serve_control


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


async def test_a_client_of_another_user_is_refused_even_if_the_mode_lets_it_in(
    nursery: trio.Nursery,
) -> None:
    """The peer's uid is checked too (SO_PEERCRED), not only the socket's mode: a client run
    as nobody, let in by a socket someone made 0666, gets no answer."""
    # A directory nobody may enter (pytest's are private), and Debian's own python (the
    # virtual environment's may live under /root).
    with tempfile.TemporaryDirectory() as directory:
        os.chmod(directory, 0o755)
        path = Path(directory) / "control.sock"
        with trio.CancelScope() as serving:
            await nursery.start(serve_control, open_control_socket(path), answer)
            path.chmod(0o666)
            script = (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "s.settimeout(30)\n"
                "s.connect(sys.argv[1])\n"
                "try:\n"
                '    s.sendall(b\'{\\"command\\": \\"status\\"}\\n\')\n'
                "    print(repr(s.recv(65536)))\n"
                "except (BrokenPipeError, ConnectionResetError):\n"  # closed, request unread
                "    print(repr(b''))\n"
            )
            nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
            done = await trio.run_process(
                [*nobody, "/usr/bin/python3", "-c", script, str(path)],
                capture_stdout=True,
                check=True,
            )
            assert done.stdout.decode().strip() == "b''"  # closed without an answer
            as_root = await trio.to_thread.run_sync(request, path, {"command": "status"})
            assert as_root == {"echo": {"command": "status"}}
            serving.cancel()
