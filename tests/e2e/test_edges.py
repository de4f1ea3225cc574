"""Paths no other test walked: a token that does not come in time, "too many connections"
for POP3 and SMTP, and a client whose TLS handshake after STARTTLS fails or never ends."""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, start_proxy
from tests.e2e.helpers import in_thread
from tests.e2e.test_abuse import login

if TYPE_CHECKING:
    import trio

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot
    from tests.support.entra import EntraEmulator

pytestmark = [pytest.mark.e2e]


async def test_no_token_within_token_timeout_is_temporary(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    idp: EntraEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.limits.update(token_timeout=0.5)
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    idp.latency = 3
    try:
        reply = await in_thread(lambda: login(pki, proxy.port, PASSWORD))
    finally:
        idp.latency = 0
    assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
    assert "login 'reports@contoso.com': no token for app 'contoso' within 0.5s" in caplog.text
    assert '"reason": "no token in time"' in caplog.text


@pytest.mark.parametrize(
    ("protocol", "busy"),
    [
        ("pop3", b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"),
        ("smtp", b"421 4.7.0 "),
    ],
)
async def test_too_many_connections_for_pop3_and_smtp(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
    busy: bytes,
) -> None:
    rig.limits.update(max_connections=1)
    upstream = dovecot.ports.pop3s if protocol == "pop3" else dovecot.ports.submissions or 0
    listener = Listener(protocol=protocol, tls="starttls", upstream_port=upstream)
    proxy = await start_proxy(nursery, rig.write([listener]))

    def over_the_limit() -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as first:
            greeting = first.recv(4096)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as second:
                refused = b""
                while chunk := second.recv(4096):
                    refused += chunk
                return greeting, refused

    greeting, refused = await in_thread(over_the_limit)
    assert greeting.startswith(b"+OK" if protocol == "pop3" else b"220 ")
    assert refused.startswith(busy), refused
    assert "refused: too many connections" in caplog.text


STARTTLS = {
    "imap": (b"a1 STARTTLS\r\n", b"a1 OK"),
    "pop3": (b"STLS\r\n", b"+OK"),
    "smtp": (b"EHLO client.test\r\nSTARTTLS\r\n", b"220 2.0.0"),
}


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
@pytest.mark.parametrize("how", ["garbage", "silence", "untrusted"])
async def test_a_failed_client_handshake_after_starttls_ends_quietly(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
    how: str,
) -> None:
    rig.limits.update(tls_handshake_timeout=0.5)
    upstream = {
        "imap": dovecot.ports.imaps,
        "pop3": dovecot.ports.pop3s,
        "smtp": dovecot.ports.submissions or 0,
    }[protocol]
    listener = Listener(protocol=protocol, tls="starttls", upstream_port=upstream)
    proxy = await start_proxy(nursery, rig.write([listener]))
    command, ok = STARTTLS[protocol]

    def client() -> None:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
            sock.recv(4096)
            sock.sendall(command)
            reply = b""
            while ok not in reply:
                chunk = sock.recv(4096)
                assert chunk, reply
                reply += chunk
            if how == "garbage":
                sock.sendall(b"\x16\x03\x01\x00\x05hello")  # a handshake record, but nonsense
            elif how == "untrusted":
                # A client that does not trust the proxy's CA gives up mid-handshake.
                context = ssl.create_default_context()
                with pytest.raises(ssl.SSLCertVerificationError):
                    context.wrap_socket(sock, server_hostname="localhost")
                return
            rest = b""
            while chunk := sock.recv(4096):  # until the proxy hangs up
                rest += chunk
            assert rest in (b"", b"\x15\x03\x03\x00\x02\x02\x0a")  # at most a TLS alert

    await in_thread(client)
    expected = {
        "garbage": "client: TLS handshake TLS error: UNEXPECTED_MESSAGE",
        "silence": "client: TLS handshake timed out",
        "untrusted": "client: TLS handshake TLS error",
    }[how]
    assert expected in caplog.text
    assert "internal error" not in caplog.text
    assert MAILBOX not in caplog.text  # nothing was logged in
