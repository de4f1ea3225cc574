"""The control socket: ``xoauth2-proxy status`` and ``unlock`` talk to ``serve`` here.

A Unix stream socket created with mode 0600 (only the user the proxy runs as, and root,
can connect), and each client's credentials are checked again (``SO_PEERCRED``): root or
that same user. One JSON object per line each way, one request per connection, bounded in
size and time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import stat
import struct
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

__all__ = ["ControlError", "open_control_socket", "request", "serve_control"]

log = logging.getLogger("xoauth2_proxy.control")

#: The largest request or answer line.
MAX_REQUEST = 4096
MAX_ANSWER = 4 * 1024 * 1024
#: Seconds a client has for its request.
REQUEST_TIMEOUT = 5.0


class ControlError(Exception):
    """The control socket cannot be used; ``str()`` says why."""


def open_control_socket(path: Path) -> trio.socket.SocketType:
    """Bind and listen at ``path`` (mode 0600), replacing a stale socket left there."""
    try:
        info = path.lstat()
        if not stat.S_ISSOCK(info.st_mode):
            raise ControlError(f"{path} exists and is not a socket; not replacing it")
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # another user's socket in a sticky directory, say
        raise ControlError(f"cannot replace {path}: {exc.strerror or exc}") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))  # a local file system operation: it does not wait
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot create {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old)
    return trio.socket.from_stdlib_socket(sock)


async def serve_control(
    sock: trio.socket.SocketType,
    handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on ``sock`` with ``handle`` until cancelled."""
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        task_status.started()
        await trio.serve_listeners(
            functools.partial(_connection, handle), [listener], handler_nursery=nursery
        )


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)


async def _connection(
    handle: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]], stream: trio.SocketStream
) -> None:
    try:
        uid = _peer_uid(stream.socket)
        if uid not in (0, os.geteuid()):
            log.warning("control socket: refused a client running as uid %d", uid)
            return
        with trio.move_on_after(REQUEST_TIMEOUT):
            line = b""
            while b"\n" not in line:
                data = await stream.receive_some(MAX_REQUEST)
                if not data:
                    return
                line += data
                if len(line) > MAX_REQUEST:
                    await stream.send_all(_line({"error": "request too long"}))
                    return
            try:
                request = json.loads(line.split(b"\n", 1)[0])
            except ValueError:
                request = None
            if not isinstance(request, dict):
                answer: dict[str, Any] = {"error": "not a JSON object"}
            else:
                answer = await handle(request)
            await stream.send_all(_line(answer))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


def _line(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer, ensure_ascii=True).encode() + b"\n"


def request(path: Path, message: dict[str, Any], *, timeout: float = 10.0) -> dict[str, Any]:
    """Send ``message`` to the control socket at ``path`` and return the answer (blocking,
    for the command line). :exc:`ControlError` if nothing answers there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
                if len(answer) > MAX_ANSWER:
                    raise ControlError(f"{path}: answer too long")
        except FileNotFoundError as exc:
            raise ControlError(f"{path} does not exist: is serve running?") from exc
        except ConnectionRefusedError as exc:
            raise ControlError(f"nothing listens on {path}: is serve running?") from exc
        except PermissionError as exc:
            raise ControlError(
                f"{path}: permission denied; run this as root or as the user serve runs as"
            ) from exc
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from exc
    with contextlib.suppress(ValueError):
        parsed = json.loads(answer)
        if isinstance(parsed, dict):
            return parsed
    raise ControlError(f"{path}: no answer (was the request refused?)")
