"""The HTTP listener for operations: ``/metrics``, ``/healthz`` and ``/readyz``.

HTTP/1.1 through h11 (the parser is h11's, with its size limits), one request per
connection, each connection bounded in time and the number of connections bounded: a
Prometheus server, a load balancer's probe and a kubelet are its clients, not browsers.
It runs on the proxy's own event loop, so an answer from ``/healthz`` proves the loop
answers.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11
import trio

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["HttpRequest", "HttpResponse", "serve_ops_http"]

log = logging.getLogger("xoauth2_proxy.ops")

#: Seconds a client has for its whole request and our answer.
REQUEST_TIMEOUT = 10.0
#: Connections served at once; more are closed at once.
MAX_CONNECTIONS = 32
#: The largest request head (request line and headers).
MAX_HEAD = 8192


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    accept: str = ""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


async def serve_ops_http(
    listeners: list[trio.SocketListener],
    handle: Callable[[HttpRequest], HttpResponse],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on ``listeners`` with ``handle`` until cancelled."""
    busy = trio.CapacityLimiter(MAX_CONNECTIONS)
    async with trio.open_nursery() as nursery:
        task_status.started()
        await trio.serve_listeners(
            functools.partial(_connection, handle, busy), listeners, handler_nursery=nursery
        )


async def _connection(
    handle: Callable[[HttpRequest], HttpResponse],
    busy: trio.CapacityLimiter,
    stream: trio.SocketStream,
) -> None:
    try:
        busy.acquire_nowait()
    except trio.WouldBlock:
        await trio.aclose_forcefully(stream)
        return
    try:
        with trio.move_on_after(REQUEST_TIMEOUT):
            await _exchange(handle, stream)
            await _linger(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
    finally:
        busy.release()
        await trio.aclose_forcefully(stream)


async def _linger(stream: trio.SocketStream) -> None:
    """End our side, then read what the client still sends (a refused request's rest) for
    a moment: closing with unread bytes would reset the connection, and the client could
    lose our answer."""
    await stream.send_eof()
    drained = 0
    with trio.move_on_after(1):
        while drained < 1024 * 1024 and (data := await stream.receive_some(65536)):
            drained += len(data)


async def _exchange(
    handle: Callable[[HttpRequest], HttpResponse], stream: trio.SocketStream
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            await _send(conn, stream, HttpResponse(exc.error_status_hint, b"bad request\n"))
            return
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(MAX_HEAD)))
            continue
        if not isinstance(event, h11.Request):
            return  # the client closed, or sent something we will not answer
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace").split("?", 1)[0]
        accept = b",".join(v for k, v in event.headers if k == b"accept").decode("latin-1")
        if method not in ("GET", "HEAD"):
            response = HttpResponse(405, b"only GET and HEAD\n")
        else:
            try:
                response = handle(HttpRequest(method, target, accept))
            except Exception:
                log.exception("operations endpoint %s failed", target)
                response = HttpResponse(500, b"internal error\n")
        if method == "HEAD":
            response = HttpResponse(response.status, b"", response.content_type)
        await _send(conn, stream, response)
        return


async def _send(conn: h11.Connection, stream: trio.SocketStream, response: HttpResponse) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("cache-control", "no-store"),
        ("connection", "close"),
    ]
    data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
    if response.body:
        data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
