"""Upstreams that misbehave mid-login: the client gets the temporary reply, never a
dropped connection, and the log names the upstream, not an internal error."""

from __future__ import annotations

import socket
import ssl
import struct
from typing import TYPE_CHECKING

import pytest
import trio

from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import in_thread
from tests.e2e.test_abuse import login

if TYPE_CHECKING:
    from tests.support.certs import TestPki

pytestmark = [pytest.mark.e2e]

GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] fake upstream\r\n"


async def resetting_upstream(
    pki: TestPki, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """An implicit-TLS IMAP server that greets, then resets the connection (RST) as soon as
    the client says anything."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.issue("fake-upstream", "localhost", "127.0.0.1"))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        await tls.do_handshake()
        await tls.send_all(GREETING)
        await tls.receive_some(65536)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def test_upstream_reset_after_greeting_is_a_temporary_failure(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    port = await nursery.start(resetting_upstream, pki)
    assert rig.dovecot.ca_file == pki.ca_file  # the listener trusts our test CA
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=port)]))
    reply = await in_thread(lambda: login(pki, proxy.port, PASSWORD, user=MAILBOX))
    assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
    assert "internal error" not in caplog.text
