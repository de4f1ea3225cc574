"""A legacy SMTP client (the standard library's smtplib) through the proxy to Dovecot's
submission service, which relays to a sink that records every message byte for byte."""

from __future__ import annotations

import base64
import re
import smtplib
import socket
from typing import TYPE_CHECKING

import pytest

from tests.e2e.conftest import (
    MAILBOX,
    OTHER_MAILBOX,
    PASSWORD,
    Listener,
    ProxyRig,
    RunningProxy,
    start_proxy,
)
from tests.e2e.helpers import in_thread, message, raw_session, starttls_listener, tls_context

if TYPE_CHECKING:
    import trio

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot
    from tests.support.entra import EntraEmulator
    from tests.support.smtpsink import SmtpSink

pytestmark = [pytest.mark.e2e]

RECIPIENTS = ["someone@example.com", "other@example.org"]


def implicit_listener(dovecot: Dovecot) -> Listener:
    """Port 465 style on both sides."""
    assert dovecot.ports.submissions is not None
    return Listener(protocol="smtp", upstream_port=dovecot.ports.submissions)


@pytest.fixture
async def smtp_proxy(nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot) -> RunningProxy:
    return await start_proxy(nursery, rig.write([starttls_listener(dovecot)]))


def relayed(sink: SmtpSink, body: bytes, before: int) -> bytes:
    """The relayed copy of ``body`` minus the one Received header Dovecot prepends."""
    for received in sink.wait_for(before + 1, timeout=10)[before:]:
        if received.data.endswith(body):
            header = received.data[: -len(body)]
            assert re.fullmatch(rb"Received: from [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*", header)
            assert received.mail_from == MAILBOX
            assert list(received.rcpt_tos) == RECIPIENTS
            return received.data[len(header) :]
    raise AssertionError("the message was not relayed")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_starttls_auth_and_send(
    smtp_proxy: RunningProxy, pki: TestPki, sink: SmtpSink, mechanism: str
) -> None:
    body = message(200_000, f"smtp-{mechanism}")
    before = len(sink.messages)

    def client() -> tuple[bool, bool, tuple[int, bytes]]:
        with smtplib.SMTP("localhost", smtp_proxy.port, timeout=30) as smtp:
            smtp.ehlo()
            auth_before_tls = smtp.has_extn("auth")
            smtp.starttls(context=tls_context(pki))
            smtp.ehlo()
            pipelining = smtp.has_extn("pipelining")
            smtp.user, smtp.password = MAILBOX, PASSWORD
            authenticator = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
            reply = smtp.auth(mechanism, authenticator, initial_response_ok=mechanism == "PLAIN")
            assert smtp.sendmail(MAILBOX, RECIPIENTS, body) == {}
            return auth_before_tls, pipelining, reply

    auth_before_tls, pipelining, reply = await in_thread(client)
    assert not auth_before_tls
    assert pipelining  # learned from Dovecot's EHLO
    assert reply[0] == 235
    assert await in_thread(lambda: relayed(sink, body, before)) == body


async def test_implicit_tls_on_both_sides(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki, sink: SmtpSink
) -> None:
    proxy = await start_proxy(nursery, rig.write([implicit_listener(dovecot)]))
    body = message(5000, "smtp-implicit")
    before = len(sink.messages)

    def client() -> None:
        with smtplib.SMTP_SSL("localhost", proxy.port, context=tls_context(pki), timeout=30) as s:
            s.login(MAILBOX, PASSWORD)
            assert s.sendmail(MAILBOX, RECIPIENTS, body) == {}

    await in_thread(client)
    assert await in_thread(lambda: relayed(sink, body, before)) == body


async def test_pipelined_envelope_behind_auth(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki, sink: SmtpSink
) -> None:
    """RFC 2920: a client may send its envelope right behind AUTH, without waiting."""
    proxy = await start_proxy(nursery, rig.write([implicit_listener(dovecot)]))
    body = message(1000, "smtp-pipelined")
    before = len(sink.messages)
    plain = base64.b64encode(f"\0{MAILBOX}\0{PASSWORD}".encode()).decode()
    script = "".join(
        [
            "EHLO client.test\r\n",
            f"AUTH PLAIN {plain}\r\n",
            f"MAIL FROM:<{MAILBOX}>\r\n",
            *(f"RCPT TO:<{r}>\r\n" for r in RECIPIENTS),
            "DATA\r\n",
        ]
    ).encode()

    def client() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock,
            tls_context(pki).wrap_socket(sock, server_hostname="localhost") as tls,
            tls.makefile("rwb") as stream,
        ):
            stream.readline()  # greeting
            stream.write(script)
            stream.flush()
            replies = line = b""
            while not line.startswith(b"354 "):
                line = stream.readline()
                assert line, replies
                replies += line
            stream.write(body + b".\r\nQUIT\r\n")
            stream.flush()
            replies += stream.read()
            return replies

    replies = await in_thread(client)
    assert replies.startswith(b"250")  # EHLO, then
    assert b"\n235 " in replies
    assert b"\r\n221 " in replies
    assert await in_thread(lambda: relayed(sink, body, before)) == body


async def test_bdat_chunks_are_relayed_unchanged(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki, sink: SmtpSink
) -> None:
    """RFC 3030 CHUNKING, passed on from the upstream's EHLO: a message in two BDAT chunks,
    the second LAST, arrives byte for byte (binary-safe: no dot-stuffing, no terminator)."""
    proxy = await start_proxy(nursery, rig.write([implicit_listener(dovecot)]))
    body = message(20_000, "smtp-bdat")
    first, second = body[:7000], body[7000:]
    before = len(sink.messages)
    plain = base64.b64encode(f"\0{MAILBOX}\0{PASSWORD}".encode()).decode()

    def client() -> list[bytes]:
        with (
            socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock,
            tls_context(pki).wrap_socket(sock, server_hostname="localhost") as tls,
            tls.makefile("rwb") as stream,
        ):

            def reply() -> bytes:
                lines = [stream.readline()]
                while lines[-1][3:4] == b"-":
                    lines.append(stream.readline())
                return b"".join(lines)

            def say(data: bytes) -> bytes:
                stream.write(data)
                stream.flush()
                return reply()

            reply()  # greeting
            say(b"EHLO client.test\r\n")
            replies = [say(f"AUTH PLAIN {plain}\r\n".encode())]
            replies.append(say(b"EHLO client.test\r\n"))  # the upstream's list, after login
            replies.append(say(f"MAIL FROM:<{MAILBOX}>\r\n".encode()))
            replies += [say(f"RCPT TO:<{r}>\r\n".encode()) for r in RECIPIENTS]
            replies.append(say(b"BDAT %d\r\n" % len(first) + first))
            replies.append(say(b"BDAT %d LAST\r\n" % len(second) + second))
            replies.append(say(b"QUIT\r\n"))
            return replies

    replies = await in_thread(client)
    assert replies[0].startswith(b"235 ")
    assert b"CHUNKING" in replies[1]
    assert all(r.startswith(b"250") for r in replies[2:-1]), replies
    assert await in_thread(lambda: relayed(sink, body, before)) == body


def auth_result(pki: TestPki, port: int, login: str, password: str) -> bytes:
    plain = base64.b64encode(f"\0{login}\0{password}".encode())
    script = b"EHLO client.test\r\nAUTH PLAIN " + plain + b"\r\nQUIT\r\n"
    transcript = raw_session(pki, port, script, b"\r\n221 ", use_tls=True)
    for line in transcript.split(b"\r\n"):
        if line[:3] in (b"235", b"535", b"454", b"421", b"530"):
            return line
    raise AssertionError(f"no AUTH result in {transcript!r}")


@pytest.fixture
async def smtps_proxy(nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot) -> RunningProxy:
    return await start_proxy(nursery, rig.write([implicit_listener(dovecot)]))


async def test_wrong_password_and_unknown_user_look_the_same(
    smtps_proxy: RunningProxy, pki: TestPki
) -> None:
    def both() -> tuple[bytes, bytes]:
        return (
            auth_result(pki, smtps_proxy.port, MAILBOX, "wrong password"),
            auth_result(pki, smtps_proxy.port, "nobody@contoso.com", PASSWORD),
        )

    wrong, unknown = await in_thread(both)
    assert wrong == unknown
    assert wrong.startswith(b"535 5.7.8")


async def test_identity_provider_trouble_is_temporary(
    smtps_proxy: RunningProxy, pki: TestPki, idp: EntraEmulator
) -> None:
    idp.fail_next(429, retry_after=1, count=5)
    try:
        reply = await in_thread(lambda: auth_result(pki, smtps_proxy.port, MAILBOX, PASSWORD))
    finally:
        idp.fail_next(429, count=0)
    assert reply.startswith(b"454 4.7.0"), reply


async def test_upstream_refusing_the_token_is_an_auth_failure(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.add_user("ghost-user@contoso.com", PASSWORD, mailbox="ghost@contoso.com")
    proxy = await start_proxy(nursery, rig.write([implicit_listener(dovecot)]))
    reply = await in_thread(
        lambda: auth_result(pki, proxy.port, "ghost-user@contoso.com", PASSWORD)
    )
    assert reply.startswith(b"535 5.7.8"), reply
    # One line naming the likely cause, at warning level.
    [diagnosis] = [
        r
        for r in caplog.records
        if r.name == "xoauth2_proxy.session" and "the upstream rejected the token" in r.message
    ]
    assert diagnosis.levelname == "WARNING"
    assert "'ghost@contoso.com'" in diagnosis.message
    assert "Likely causes:" in diagnosis.message


async def test_token_without_the_smtp_role_is_refused_locally(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.add_user(OTHER_MAILBOX, PASSWORD, app="roleless")
    proxy = await start_proxy(nursery, rig.write([implicit_listener(dovecot)]))
    reply = await in_thread(lambda: auth_result(pki, proxy.port, OTHER_MAILBOX, PASSWORD))
    assert reply.startswith(b"454 4.7.0"), reply
    assert "SMTP.SendAsApp" in caplog.text


async def test_auth_before_starttls_is_refused(smtp_proxy: RunningProxy, pki: TestPki) -> None:
    plain = base64.b64encode(f"\0{MAILBOX}\0{PASSWORD}".encode())
    script = b"EHLO client.test\r\nAUTH PLAIN " + plain + b"\r\nQUIT\r\n"
    transcript = await in_thread(
        lambda: raw_session(pki, smtp_proxy.port, script, b"\r\n221 ", use_tls=False)
    )
    assert b"\r\n530 5.7.0" in transcript
    assert b"AUTH" not in transcript.split(b"\r\n530")[0]  # not offered before TLS
