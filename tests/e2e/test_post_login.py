"""After the login: an upstream that answers like Exchange does when the app may not open
the mailbox ("User is authenticated but not connected", SendAsDenied), or when the
session's token expires (AccessTokenExpired). The client gets the upstream's words
unchanged; the log names the mailbox and the fix, the audit line and the metrics say that
the session did not really open."""

from __future__ import annotations

import imaplib
import json
import poplib
import smtplib
import ssl
from typing import TYPE_CHECKING

import pytest
import trio

from proxy.net.proxy_protocol import read_proxy_header
from tests.e2e.conftest import MAILBOX, PASSWORD, Listener, ProxyRig, RunningProxy, start_proxy
from tests.e2e.helpers import in_thread, tls_context

if TYPE_CHECKING:
    from proxy.protocol.proxy_header import ProxyHeader
    from tests.support.certs import TestPki

pytestmark = pytest.mark.e2e

NOT_CONNECTED = {
    "imap": b"BAD User is authenticated but not connected.",
    "pop3": b"-ERR User is authenticated but not connected.",
    "smtp": b"554 5.2.252 SendAsDenied; reports@contoso.com not allowed to send as "
    b"reports@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException."
    b"MapiExceptionSendAsDenied",
}


async def exchange_like(
    pki: TestPki,
    protocol: str,
    after_login: str,
    headers: list[ProxyHeader] | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """An implicit-TLS server that accepts any XOAUTH2 login and then, as Exchange does,
    refuses the mailbox (``not-connected``) or ends the session because the token expired
    (``expired``)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.issue("exchange-like", "localhost", "127.0.0.1"))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(stream: trio.SocketStream) -> None:
        if headers is not None:  # a PROXY protocol header comes first, before TLS
            headers.append(await read_proxy_header(stream))
        tls = trio.SSLStream(stream, context, server_side=True)
        buffer = b""

        async def line() -> bytes:
            nonlocal buffer
            while b"\r\n" not in buffer:
                data = await tls.receive_some(65536)
                if not data:
                    raise EOFError
                buffer += data
            text, buffer = buffer.split(b"\r\n", 1)
            return text

        with trio.move_on_after(30):
            try:
                await tls.do_handshake()
                await SCRIPTS[protocol](tls, line, after_login)
            except (EOFError, trio.BrokenResourceError):
                pass
        await trio.aclose_forcefully(tls)

    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def imap_script(tls: trio.SSLStream[trio.SocketStream], line: LineReader, after: str) -> None:
    await tls.send_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] Exchange-like ready.\r\n")
    logged_in = False
    while True:
        tag, _, command = (await line()).partition(b" ")
        verb = command.split(b" ", 1)[0].upper()
        if verb == b"CAPABILITY":
            await tls.send_all(
                b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2\r\n" + tag + b" OK\r\n"
            )
        elif verb == b"AUTHENTICATE":
            logged_in = True
            await tls.send_all(tag + b" OK AUTHENTICATE completed.\r\n")
        elif verb == b"LOGOUT":
            await tls.send_all(b"* BYE Microsoft Exchange Server IMAP4 server signing off.\r\n")
            await tls.send_all(tag + b" OK LOGOUT completed.\r\n")
            return
        elif logged_in and after == "expired":
            await tls.send_all(b"* BYE Session invalidated - AccessTokenExpired\r\n")
            return
        elif logged_in:
            await tls.send_all(tag + b" " + NOT_CONNECTED["imap"] + b"\r\n")
        else:
            await tls.send_all(tag + b" BAD Command received in Invalid state.\r\n")


async def pop3_script(tls: trio.SSLStream[trio.SocketStream], line: LineReader, after: str) -> None:
    await tls.send_all(b"+OK The Microsoft Exchange POP3 service is ready.\r\n")
    logged_in = False
    while True:
        verb = (await line()).split(b" ", 1)[0].upper()
        if verb == b"CAPA":
            await tls.send_all(b"+OK\r\nTOP\r\nUIDL\r\nSASL XOAUTH2\r\nUSER\r\n.\r\n")
        elif verb == b"AUTH":
            await tls.send_all(b"+ \r\n")
            await line()  # the token
            logged_in = True
            await tls.send_all(b"+OK User successfully authenticated.\r\n")
        elif verb == b"QUIT":
            await tls.send_all(b"+OK Microsoft Exchange Server POP3 server signing off.\r\n")
            return
        elif logged_in and after == "expired":
            await tls.send_all(b"-ERR Session invalidated - AccessTokenExpired\r\n")
            return
        elif logged_in:
            await tls.send_all(NOT_CONNECTED["pop3"] + b"\r\n")
        else:
            await tls.send_all(b"-ERR Command is not valid in this state.\r\n")


async def smtp_script(tls: trio.SSLStream[trio.SocketStream], line: LineReader, after: str) -> None:
    await tls.send_all(b"220 exchange-like Microsoft ESMTP MAIL Service ready\r\n")
    while True:
        verb = (await line()).split(b" ", 1)[0].upper()
        if verb in (b"EHLO", b"HELO"):
            await tls.send_all(
                b"250-exchange-like Hello\r\n250-SIZE 157286400\r\n250-AUTH LOGIN XOAUTH2\r\n"
                b"250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n"
            )
        elif verb == b"AUTH":
            await tls.send_all(b"334 \r\n")
            await line()
            await tls.send_all(b"235 2.7.0 Authentication successful\r\n")
        elif verb in (b"MAIL", b"RCPT"):
            if after == "expired":
                await tls.send_all(b"421 4.7.0 Session invalidated - AccessTokenExpired\r\n")
                return
            await tls.send_all(b"250 2.1.0 Sender OK\r\n")
        elif verb == b"DATA":
            await tls.send_all(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n")
            while await line() != b".":
                pass
            await tls.send_all(NOT_CONNECTED["smtp"] + b"\r\n")
        elif verb == b"QUIT":
            await tls.send_all(b"221 2.0.0 Service closing transmission channel\r\n")
            return
        else:
            await tls.send_all(b"500 5.3.3 Unrecognized command\r\n")


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    LineReader = Callable[[], Awaitable[bytes]]

SCRIPTS = {"imap": imap_script, "pop3": pop3_script, "smtp": smtp_script}


def imap_client(pki: TestPki, port: int) -> bytes:
    with imaplib.IMAP4_SSL("localhost", port, ssl_context=tls_context(pki), timeout=30) as imap:
        imap.login(MAILBOX, PASSWORD)
        try:
            imap.select("INBOX")
        except imaplib.IMAP4.error as exc:
            return str(exc).encode()
        except imaplib.IMAP4.abort as exc:
            return str(exc).encode()
        return b"selected"


def pop3_client(pki: TestPki, port: int) -> bytes:
    pop = poplib.POP3_SSL("localhost", port, context=tls_context(pki), timeout=30)
    try:
        pop.user(MAILBOX)
        pop.pass_(PASSWORD)
        try:
            pop.stat()
        except poplib.error_proto as exc:
            return str(exc).encode()
        return b"stat"
    finally:
        pop.close()


def smtp_client(pki: TestPki, port: int) -> bytes:
    with smtplib.SMTP_SSL("localhost", port, context=tls_context(pki), timeout=30) as smtp:
        smtp.login(MAILBOX, PASSWORD)
        try:
            smtp.sendmail(MAILBOX, ["someone@example.com"], b"Subject: x\r\n\r\nhello\r\n")
        except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as exc:
            error = exc.smtp_error
            return b"%d " % exc.smtp_code + (error if isinstance(error, bytes) else error.encode())
        except smtplib.SMTPServerDisconnected as exc:
            return str(exc).encode()
        return b"sent"


CLIENTS = {"imap": imap_client, "pop3": pop3_client, "smtp": smtp_client}


def audits(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "xoauth2_proxy.audit"]


def sample(proxy: RunningProxy, name: str, protocol: str) -> float:
    return proxy.server.metrics.registry.get_sample_value(name, {"protocol": protocol}) or 0.0


async def serve_in_front(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki, protocol: str, after: str
) -> RunningProxy:
    port = await nursery.start(exchange_like, pki, protocol, after)
    assert rig.dovecot.ca_file == pki.ca_file  # the listener trusts our test CA
    return await start_proxy(nursery, rig.write([Listener(protocol=protocol, upstream_port=port)]))


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
async def test_authenticated_but_not_connected_is_an_error_an_audited_failure_and_counted(
    nursery: trio.Nursery,
    rig: ProxyRig,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    proxy = await serve_in_front(nursery, rig, pki, protocol, "not-connected")
    said = await in_thread(lambda: CLIENTS[protocol](pki, proxy.port))
    # The client hears the upstream's own words.
    assert NOT_CONNECTED[protocol].split(b" ", 1)[1][:30] in said, said
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert any(
        "refused mailbox 'reports@contoso.com'" in r.getMessage()
        and "Add-MailboxPermission" in r.getMessage()
        for r in errors
    ), caplog.text
    # The login succeeded upstream, then the session did not really open: a second line.
    first, second = audits(caplog)
    assert first["result"] == "success"
    assert second["result"] == "failure"
    assert second["conn"] == first["conn"]
    assert second["mailbox"] == MAILBOX
    assert second["reason"].startswith("the upstream accepted the token, then refused the mailbox")
    assert sample(proxy, "xoauth2_proxy_not_connected_total", protocol) == 1
    assert sample(proxy, "xoauth2_proxy_token_expired_disconnects_total", protocol) == 0


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
async def test_a_token_expiry_goodbye_is_counted_and_logged(
    nursery: trio.Nursery,
    rig: ProxyRig,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
) -> None:
    proxy = await serve_in_front(nursery, rig, pki, protocol, "expired")
    said = await in_thread(lambda: CLIENTS[protocol](pki, proxy.port))
    assert b"AccessTokenExpired" in said or b"closed" in said.lower(), said
    with trio.fail_after(30):
        while not sample(proxy, "xoauth2_proxy_token_expired_disconnects_total", protocol):  # noqa: ASYNC110
            await trio.sleep(0.01)  # until the proxy has seen the upstream go
    assert "token expired (AccessTokenExpired)" in caplog.text
    (audit,) = audits(caplog)
    assert audit["result"] == "success"  # the session did open
    assert sample(proxy, "xoauth2_proxy_not_connected_total", protocol) == 0


async def test_an_ordinary_session_is_audited_as_a_success(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    """Lines that refuse nothing, and the watch's end: no error, one success."""
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=rig.dovecot.ports.imaps)]))
    assert await in_thread(lambda: imap_client(pki, proxy.port)) == b"selected"
    with trio.fail_after(30):
        while not audits(caplog):  # noqa: ASYNC110 - written when the session ends
            await trio.sleep(0.01)
    assert [a["result"] for a in audits(caplog)] == ["success"]
    assert "refused mailbox" not in caplog.text


@pytest.mark.parametrize("version", ["proxy-v1", "proxy-v2"])
async def test_the_client_address_is_passed_on_to_the_upstream(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki, version: str
) -> None:
    """upstream_client_address: a PROXY header naming the client goes upstream first."""
    headers: list[ProxyHeader] = []
    port = await nursery.start(exchange_like, pki, "imap", "expired", headers)
    listener = Listener(upstream_port=port, extra={"upstream_client_address": f'"{version}"'})
    proxy = await start_proxy(nursery, rig.write([listener]))
    await in_thread(lambda: imap_client(pki, proxy.port))
    (header,) = headers
    assert header.version == (1 if version == "proxy-v1" else 2)
    assert header.source is not None
    assert header.source[0] == "127.0.0.1"
    assert header.destination == ("127.0.0.1", proxy.port)
