"""A legacy IMAP client through the proxy to a real Dovecot that verifies the tokens.

The client is the standard library's imaplib, run in a worker thread while the proxy
serves in the test's trio loop.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import imaplib
import socket
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from tests.e2e.conftest import (
    MAILBOX,
    OTHER_MAILBOX,
    PASSWORD,
    Listener,
    ProxyRig,
    RunningProxy,
    start_proxy,
)
from tests.e2e.helpers import in_thread, message, raw_session, tls_context

if TYPE_CHECKING:
    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot
    from tests.support.entra import EntraEmulator

pytestmark = [pytest.mark.e2e]


def connect(pki: TestPki, port: int) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL("localhost", port, ssl_context=tls_context(pki), timeout=30)


def fetch_by_subject(imap: imaplib.IMAP4, subject: str) -> bytes:
    typ, data = imap.search(None, "SUBJECT", f'"{subject}"')
    assert typ == "OK", data
    ids = data[0].split()
    assert ids, f"no message with subject {subject}"
    typ, fetched = imap.fetch(ids[-1], "(BODY.PEEK[])")
    assert typ == "OK"
    part = fetched[0]
    assert isinstance(part, tuple)
    return part[1]


async def test_login_quoted_password_select_and_large_fetch(
    imap_proxy: RunningProxy, pki: TestPki, dovecot: Dovecot, idp: EntraEmulator
) -> None:
    body = message(5 * 1024 * 1024, "big-fetch")
    dovecot.deliver(MAILBOX, body)

    def client() -> bytes:
        with connect(pki, imap_proxy.port) as imap:
            assert "AUTH=PLAIN" in imap.capabilities
            login_status, _ = imap.login(MAILBOX, PASSWORD)  # imaplib quotes the password
            assert login_status == "OK"
            select_status, _ = imap.select("INBOX")
            assert select_status == "OK"
            fetched = fetch_by_subject(imap, "big-fetch")
            imap.logout()
            return fetched

    assert await in_thread(client) == body
    # Dovecot accepted the login, so it verified a token our broker got from the IdP.
    assert idp.token_requests >= 1


async def test_login_with_synchronizing_literal(imap_proxy: RunningProxy, pki: TestPki) -> None:
    def client() -> str:
        with connect(pki, imap_proxy.port) as imap:
            imap.literal = PASSWORD.encode()  # type: ignore[assignment]  # sends {n}, waits for "+"
            typ, data = imap._simple_command("LOGIN", MAILBOX)
            assert typ == "OK", data
            imap.state = "AUTH"
            typ, _ = imap.select("INBOX", readonly=True)
            imap.logout()
            return typ

    assert await in_thread(client) == "OK"


async def test_authenticate_plain_with_continuation(imap_proxy: RunningProxy, pki: TestPki) -> None:
    def client() -> str:
        with connect(pki, imap_proxy.port) as imap:
            typ, _ = imap.authenticate("PLAIN", lambda _: f"\0{MAILBOX}\0{PASSWORD}".encode())
            typ2, _ = imap.select("INBOX", readonly=True)
            imap.logout()
            return typ + typ2

    assert await in_thread(client) == "OKOK"


async def test_authenticate_plain_sasl_ir_and_pipelined_commands(
    imap_proxy: RunningProxy, pki: TestPki
) -> None:
    plain = base64.b64encode(f"\0{MAILBOX}\0{PASSWORD}".encode())
    # The SELECT and LOGOUT are pipelined right behind the login: they must reach Dovecot.
    script = b"a1 AUTHENTICATE PLAIN " + plain + b"\r\na2 SELECT INBOX\r\na3 LOGOUT\r\n"
    transcript = await in_thread(lambda: raw_session(pki, imap_proxy.port, script, b"a3 OK"))
    assert b"a1 OK" in transcript
    assert b"a2 OK [READ-WRITE]" in transcript
    assert b"a3 OK" in transcript


async def test_append_then_fetch_byte_exact(imap_proxy: RunningProxy, pki: TestPki) -> None:
    body = message(300_000, "appended")

    def client() -> bytes:
        with connect(pki, imap_proxy.port) as imap:
            imap.login(MAILBOX, PASSWORD)
            typ, data = imap.append("INBOX", None, None, body)
            assert typ == "OK", data
            imap.select("INBOX")
            fetched = fetch_by_subject(imap, "appended")
            imap.logout()
            return fetched

    assert await in_thread(client) == body


async def test_idle_sees_a_new_message(
    imap_proxy: RunningProxy, pki: TestPki, dovecot: Dovecot
) -> None:
    arrived = trio.Event()

    def client(token: trio.lowlevel.TrioToken) -> bytes:
        with connect(pki, imap_proxy.port) as imap:
            imap.login(MAILBOX, PASSWORD)
            imap.select("INBOX")
            tag = imap._new_tag()
            imap.send(tag + b" IDLE\r\n")
            assert imap.readline().startswith(b"+")
            trio.from_thread.run_sync(arrived.set, trio_token=token)
            line = imap.readline()
            while b"EXISTS" not in line:
                line = imap.readline()
            imap.send(b"DONE\r\n")
            while not imap.readline().startswith(tag + b" OK"):
                pass
            imap.logout()
            return line

    async def deliver_when_idle() -> None:
        await arrived.wait()
        await trio.sleep(0.2)
        dovecot.deliver(MAILBOX, message(100, "during-idle"))

    token = trio.lowlevel.current_trio_token()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver_when_idle)
        line = await in_thread(lambda: client(token))
    assert line.startswith(b"* ")
    assert line.rstrip().endswith(b"EXISTS")


async def test_starttls_on_both_sides(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki
) -> None:
    path = rig.write(
        [Listener(tls="starttls", upstream_port=dovecot.ports.imap, upstream_tls="starttls")]
    )
    proxy = await start_proxy(nursery, path)

    def client() -> tuple[list[str], str, str]:
        with imaplib.IMAP4("localhost", proxy.port, timeout=30) as imap:
            before = list(imap.capabilities)
            with pytest.raises(imaplib.IMAP4.error):
                imap.login(MAILBOX, PASSWORD)  # refused before TLS
            imap.starttls(tls_context(pki))
            typ, _ = imap.login(MAILBOX, PASSWORD)
            typ2, _ = imap.select("INBOX", readonly=True)
            imap.logout()
            return before, typ, typ2

    before, typ, typ2 = await in_thread(client)
    assert "STARTTLS" in before
    assert "LOGINDISABLED" in before
    assert not any(c.startswith("AUTH=") for c in before)
    assert (typ, typ2) == ("OK", "OK")


def login_reply(pki: TestPki, port: int, login: str, password: str) -> bytes:
    quoted = password.replace("\\", "\\\\").replace('"', '\\"')
    script = f'a1 LOGIN "{login}" "{quoted}"\r\n'.encode()
    reply = raw_session(pki, port, script, b"a1 ")
    return reply[reply.index(b"a1 ") :].split(b"\r\n")[0]


async def test_wrong_password_and_unknown_user_look_the_same(
    imap_proxy: RunningProxy, pki: TestPki
) -> None:
    def both() -> tuple[bytes, bytes]:
        return (
            login_reply(pki, imap_proxy.port, MAILBOX, "wrong password"),
            login_reply(pki, imap_proxy.port, "nobody@contoso.com", PASSWORD),
        )

    wrong, unknown = await in_thread(both)
    assert wrong == unknown
    assert wrong.startswith(b"a1 NO [AUTHENTICATIONFAILED]")


async def test_identity_provider_trouble_is_temporary(
    imap_proxy: RunningProxy, pki: TestPki, idp: EntraEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    for status in (503, 429):
        idp.fail_next(status, retry_after=1 if status == 429 else None, count=5)
        reply = await in_thread(lambda: login_reply(pki, imap_proxy.port, MAILBOX, PASSWORD))
        assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
        idp.fail_next(status, count=0)  # clear what the retries did not use
    errors = [
        r.message
        for r in caplog.records
        if r.name == "xoauth2_proxy.session" and "no token (temporary error" in r.message
    ]
    assert len(errors) == 2, errors  # one per login, each saying why


async def test_bad_client_secret_is_unavailable_with_aadsts_in_log(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    (rig.directory / "client-secret").write_text("not-the-secret\n")
    proxy = await start_proxy(nursery, path)
    reply = await in_thread(lambda: login_reply(pki, proxy.port, MAILBOX, PASSWORD))
    assert reply.startswith(b"a1 NO [UNAVAILABLE]")
    assert "AADSTS7000215" in caplog.text


async def test_upstream_refuses_token(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.add_user("ghost-user@contoso.com", PASSWORD, mailbox="ghost@contoso.com")
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    reply = await in_thread(
        lambda: login_reply(pki, proxy.port, "ghost-user@contoso.com", PASSWORD)
    )
    assert reply.startswith(b"a1 NO [AUTHENTICATIONFAILED]"), reply
    # One line naming the likely cause, at warning level.
    [diagnosis] = [
        r
        for r in caplog.records
        if r.name == "xoauth2_proxy.session" and "the upstream rejected the token" in r.message
    ]
    assert diagnosis.levelname == "WARNING"
    assert "'ghost@contoso.com'" in diagnosis.message
    assert "Likely causes:" in diagnosis.message


async def test_token_without_the_imap_role_is_refused_locally(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.add_user(OTHER_MAILBOX, PASSWORD, app="roleless")
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=dovecot.ports.imaps)]))
    reply = await in_thread(lambda: login_reply(pki, proxy.port, OTHER_MAILBOX, PASSWORD))
    assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
    assert "IMAP.AccessAsApp" in caplog.text
    assert "consent" in caplog.text


async def test_upstream_unreachable(
    nursery: trio.Nursery, rig: ProxyRig, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    proxy = await start_proxy(nursery, rig.write([Listener(upstream_port=closed_port)]))
    reply = await in_thread(lambda: login_reply(pki, proxy.port, MAILBOX, PASSWORD))
    assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
    assert "cannot connect" in caplog.text


async def test_upstream_certificate_not_trusted(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = Listener(upstream_port=dovecot.ports.imaps, trust_upstream=False)
    proxy = await start_proxy(nursery, rig.write([listener]))
    reply = await in_thread(lambda: login_reply(pki, proxy.port, MAILBOX, PASSWORD))
    assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
    assert "certificate verification failed" in caplog.text


async def test_upstream_host_name_mismatch(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Dovecot's certificate names localhost and 127.0.0.1, not 127.0.0.2.
    listener = Listener(upstream_port=dovecot.ports.imaps, upstream_host="127.0.0.2")
    proxy = await start_proxy(nursery, rig.write([listener]))
    reply = await in_thread(lambda: login_reply(pki, proxy.port, MAILBOX, PASSWORD))
    assert reply.startswith(b"a1 NO [UNAVAILABLE]"), reply
    assert "certificate verification failed" in caplog.text


async def test_logout_ends_tls_with_close_notify(imap_proxy: RunningProxy, pki: TestPki) -> None:
    """After LOGOUT the client sees TLS end cleanly; a strict client (OpenSSL 3 without
    ragged EOFs allowed) would report a bare TCP close as a truncation attack."""

    def session() -> bytes:
        raw = socket.create_connection(("127.0.0.1", imap_proxy.port), timeout=30)
        with tls_context(pki).wrap_socket(
            raw, server_hostname="localhost", suppress_ragged_eofs=False
        ) as tls:
            quoted = PASSWORD.replace("\\", "\\\\").replace('"', '\\"')
            tls.sendall(f'a1 LOGIN "{MAILBOX}" "{quoted}"\r\na2 LOGOUT\r\n'.encode())
            received = b""
            while chunk := tls.recv(65536):  # raises SSLEOFError on a ragged end
                received += chunk
            return received

    transcript = await in_thread(session)
    assert b"a1 OK" in transcript
    assert b"a2 OK" in transcript


async def test_shutdown_closes_a_connection_in_its_tls_handshake(
    rig: ProxyRig, dovecot: Dovecot
) -> None:
    """A client that connected but never sent its ClientHello: shutdown cancels the
    handshake, and the connection is closed then, not left to the garbage collector."""
    path = rig.write([Listener(upstream_port=dovecot.ports.imaps)])
    gc.disable()  # the garbage collector would close a leaked socket, hiding the leak
    try:
        with socket.socket() as client:
            async with trio.open_nursery() as nursery:
                proxy = await start_proxy(nursery, path)
                client.connect(("127.0.0.1", proxy.port))
                with trio.fail_after(30):  # until the proxy waits in the handshake
                    while not proxy.server.sessions_open:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    await trio.testing.wait_all_tasks_blocked()
                proxy.server.shutdown()
            client.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(10) == b""  # closed, not still open
    finally:
        gc.enable()


async def test_overlong_line_is_refused_and_closed(imap_proxy: RunningProxy, pki: TestPki) -> None:
    script = b"a1 LOGIN " + b"x" * 100_000 + b"\r\n"
    transcript = await in_thread(lambda: raw_session(pki, imap_proxy.port, script, b"\x00"))
    # Read until the proxy closed: the untagged BAD, then BYE, then nothing.
    assert transcript.endswith(b"* BAD Line too long.\r\n* BYE Closing the connection.\r\n")
