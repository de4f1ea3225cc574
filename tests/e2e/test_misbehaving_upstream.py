"""Upstreams that misbehave mid-login: the client gets the temporary reply, never a
dropped connection, and the log names the upstream, not an internal error."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from typing import TYPE_CHECKING

import pytest
import trio

from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import in_thread, raw_session
from tests.e2e.test_abuse import login
from tests.e2e.test_pop3 import pass_reply
from tests.e2e.test_smtp import auth_result

if TYPE_CHECKING:
    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot

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


async def injecting_upstream(
    *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """A plaintext IMAP server that answers STARTTLS with its OK *and* an untagged response
    in the same packet: a man in the middle's attempt to get a line taken as said in TLS."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(stream: trio.SocketStream) -> None:
        await stream.send_all(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] fake\r\n")
        buffer = b""
        while b"\r\n" not in buffer:
            data = await stream.receive_some(4096)
            if not data:
                return
            buffer += data
        tag = buffer.split(b" ", 1)[0]
        await stream.send_all(tag + b" OK Begin TLS\r\n* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\n")
        await stream.receive_some(4096)  # a ClientHello must never come

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def test_bytes_behind_the_upstream_starttls_reply_end_the_upstream_connection(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    port = await nursery.start(injecting_upstream)
    listener = Listener(upstream_port=port, upstream_tls="starttls")
    proxy = await start_proxy(nursery, rig.write([listener]))

    def session() -> bytes:
        script = f'a1 LOGIN "{MAILBOX}" "{PASSWORD.replace(chr(34), chr(92) + chr(34))}"\r\n'
        return raw_session(pki, proxy.port, script.encode(), b"\x00")  # read until closed

    transcript = await in_thread(session)
    # A man in the middle is not a password problem: a temporary refusal, then goodbye.
    assert b"* BYE [UNAVAILABLE]" in transcript, transcript
    assert b"a1 OK" not in transcript
    assert "upstream sent data behind its STARTTLS OK" in caplog.text
    assert "internal error" not in caplog.text


@pytest.mark.parametrize("protocol", ["pop3", "smtp"])
@pytest.mark.parametrize("trouble", ["unreachable", "untrusted"])
async def test_upstream_trouble_is_temporary_for_pop3_and_smtp(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
    trouble: str,
) -> None:
    """What IMAP tests in test_imap.py, for the other two: an upstream that refuses the
    connection, or whose certificate is not trusted, is a temporary failure."""
    if trouble == "unreachable":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]  # nothing listens there once the probe is closed
    else:
        port = dovecot.ports.pop3s if protocol == "pop3" else (dovecot.ports.submissions or 0)
    listener = Listener(protocol=protocol, upstream_port=port, trust_upstream=False)
    proxy = await start_proxy(nursery, rig.write([listener]))
    if protocol == "pop3":
        reply = await in_thread(lambda: pass_reply(pki, proxy.port, MAILBOX, PASSWORD))
        assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
    else:
        reply = await in_thread(lambda: auth_result(pki, proxy.port, MAILBOX, PASSWORD))
        assert reply.startswith(b"454 4.7.0"), reply
    cause = "cannot connect" if trouble == "unreachable" else "certificate verification failed"
    assert cause in caplog.text


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
@pytest.mark.parametrize("trouble", ["untrusted", "wrong host name"])
async def test_upstream_starttls_verifies_the_certificate_and_host_name(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
    trouble: str,
) -> None:
    """The STARTTLS path to the upstream checks what the implicit path checks: a
    certificate from an untrusted CA, or one that does not name the upstream's host (Dovecot
    listens on 127.0.0.2 too, and its certificate names localhost and 127.0.0.1), is a
    temporary failure, and the token never leaves."""
    port = {
        "imap": dovecot.ports.imap,
        "pop3": dovecot.ports.pop3,
        "smtp": dovecot.ports.submission or 0,
    }[protocol]
    listener = Listener(
        protocol=protocol,
        upstream_port=port,
        upstream_tls="starttls",
        upstream_host="127.0.0.2" if trouble == "wrong host name" else "127.0.0.1",
        trust_upstream=trouble != "untrusted",
    )
    proxy = await start_proxy(nursery, rig.write([listener]))
    if protocol == "imap":
        reply = await in_thread(lambda: login(pki, proxy.port, PASSWORD, user=MAILBOX))
        assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
    elif protocol == "pop3":
        reply = await in_thread(lambda: pass_reply(pki, proxy.port, MAILBOX, PASSWORD))
        assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
    else:
        reply = await in_thread(lambda: auth_result(pki, proxy.port, MAILBOX, PASSWORD))
        assert reply.startswith(b"454 4.7.0"), reply
    why = {
        "untrusted": "unable to get local issuer certificate",
        "wrong host name": "IP address mismatch, certificate is not valid for '127.0.0.2'",
    }[trouble]
    assert f"STARTTLS certificate verification failed: {why}" in caplog.text
    assert "internal error" not in caplog.text


async def chatty_upstream(
    pki: TestPki, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """An implicit-TLS IMAP server that answers AUTHENTICATE with untagged responses and
    never a tagged one: 100 KB of them, past what the proxy keeps for the client."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.issue("chatty-upstream", "localhost", "127.0.0.1"))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, context, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await tls.do_handshake()
            await tls.send_all(GREETING)
            await tls.receive_some(65536)  # the AUTHENTICATE
            for n in range(100):
                await tls.send_all(b"* OK [ALERT] " + b"x" * 1000 + str(n).encode() + b"\r\n")
            await tls.receive_some(65536)

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def test_untagged_responses_at_login_are_bounded(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    port = await nursery.start(chatty_upstream, pki)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=port)]))

    def session() -> bytes:
        script = f'a1 LOGIN "{MAILBOX}" "{PASSWORD.replace(chr(34), chr(92) + chr(34))}"\r\n'
        return raw_session(pki, proxy.port, script.encode(), b"\x00")  # read until closed

    transcript = await in_thread(session)
    # The upstream's fault: the temporary goodbye, and nothing of its flood reaches the client.
    assert transcript.endswith(b"* BYE [UNAVAILABLE] Temporary failure, try again later.\r\n")
    assert b"[ALERT]" not in transcript
    assert "too many untagged responses at login" in caplog.text
    assert "internal error" not in caplog.text
