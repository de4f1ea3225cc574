"""A legacy POP3 client (the standard library's poplib) through the proxy to Dovecot."""

from __future__ import annotations

import base64
import poplib
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
from tests.e2e.helpers import in_thread, message, raw_session, tls_context

if TYPE_CHECKING:
    import trio

    from tests.support.certs import TestPki
    from tests.support.dovecot import Dovecot
    from tests.support.entra import EntraEmulator

pytestmark = [pytest.mark.e2e]


@pytest.fixture
async def pop3_proxy(nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot) -> RunningProxy:
    """POP3 over implicit TLS on both sides (port 995 style)."""
    listener = Listener(protocol="pop3", upstream_port=dovecot.ports.pop3s)
    return await start_proxy(nursery, rig.write([listener]))


def connect(pki: TestPki, port: int) -> poplib.POP3_SSL:
    return poplib.POP3_SSL("localhost", port, context=tls_context(pki), timeout=30)


def retrieve(pop: poplib.POP3, number: int) -> bytes:
    _, lines, _ = pop.retr(number)  # poplib undoes the dot-stuffing
    return b"".join(line + b"\r\n" for line in lines)


def command(pop: poplib.POP3, line: str) -> bytes:
    """Send one line, return the reply; poplib has no public call for AUTH. Raises
    ``poplib.error_proto`` unless the reply starts with ``+``."""
    reply: bytes = pop._shortcmd(line)  # type: ignore[attr-defined]
    return reply


def auth_plain(pop: poplib.POP3, login: str, password: str) -> bytes:
    response = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    return command(pop, f"AUTH PLAIN {response}")


async def test_user_pass_stat_uidl_and_large_retr(
    pop3_proxy: RunningProxy, pki: TestPki, dovecot: Dovecot, idp: EntraEmulator
) -> None:
    body = message(3 * 1024 * 1024, "pop3-large")
    dovecot.deliver(MAILBOX, body)

    def client() -> tuple[list[str], bytes]:
        pop = connect(pki, pop3_proxy.port)
        try:
            capabilities = list(pop.capa())
            assert pop.user(MAILBOX).startswith(b"+OK")
            assert pop.pass_(PASSWORD).startswith(b"+OK")
            count, size = pop.stat()
            assert count >= 1
            assert size >= len(body)
            _, uidls, _ = pop.uidl()
            assert len(uidls) == count
            retrieved = [retrieve(pop, n) for n in range(1, count + 1)]
            pop.quit()
        finally:
            pop.close()
        return capabilities, next(m for m in retrieved if b"pop3-large" in m)

    capabilities, retrieved = await in_thread(client)
    assert retrieved == body
    assert {"USER", "SASL", "AUTH-RESP-CODE"} <= set(capabilities)
    assert idp.token_requests >= 1


async def test_auth_plain_with_initial_response(pop3_proxy: RunningProxy, pki: TestPki) -> None:
    def client() -> bytes:
        pop = connect(pki, pop3_proxy.port)
        try:
            reply = auth_plain(pop, MAILBOX, PASSWORD)
            pop.stat()
            pop.quit()
        finally:
            pop.close()
        return reply

    assert (await in_thread(client)).startswith(b"+OK")


async def test_auth_login_with_continuations(pop3_proxy: RunningProxy, pki: TestPki) -> None:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    def exchange() -> list[bytes]:
        pop = connect(pki, pop3_proxy.port)
        try:
            # Each answer goes out only once its "+ " continuation has arrived.
            replies = [command(pop, line) for line in ("AUTH LOGIN", b64(MAILBOX), b64(PASSWORD))]
            pop.stat()
            pop.quit()
        finally:
            pop.close()
        return replies

    username_prompt, password_prompt, final = await in_thread(exchange)
    assert username_prompt.startswith(b"+ ")
    assert password_prompt.startswith(b"+ ")
    assert final.startswith(b"+OK")


async def test_pipelined_commands_behind_the_login_reach_the_upstream(
    pop3_proxy: RunningProxy, pki: TestPki
) -> None:
    script = f"USER {MAILBOX}\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n".encode()
    transcript = await in_thread(lambda: raw_session(pki, pop3_proxy.port, script, b"Logging out"))
    replies = transcript.split(b"\r\n")
    assert replies[1].startswith(b"+OK")  # USER
    assert replies[2].startswith(b"+OK")  # PASS
    assert replies[3].startswith(b"+OK ")  # STAT, answered by Dovecot: "+OK n size"
    assert replies[3].split()[1].isdigit()


async def test_stls_on_both_sides(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki
) -> None:
    listener = Listener(
        protocol="pop3", tls="starttls", upstream_port=dovecot.ports.pop3, upstream_tls="starttls"
    )
    proxy = await start_proxy(nursery, rig.write([listener]))

    def client() -> tuple[dict[str, list[str]], dict[str, list[str]], bytes]:
        pop = poplib.POP3("localhost", proxy.port, timeout=30)
        try:
            before = pop.capa()
            with pytest.raises(poplib.error_proto):
                pop.user(MAILBOX)  # no credentials before TLS
            pop.stls(tls_context(pki))
            after = pop.capa()
            pop.user(MAILBOX)
            reply = pop.pass_(PASSWORD)
            pop.stat()
            pop.quit()
        finally:
            pop.close()
        return before, after, reply

    before, after, reply = await in_thread(client)
    assert "STLS" in before
    assert "USER" not in before
    assert "SASL" not in before
    assert "STLS" not in after
    assert "USER" in after
    assert reply.startswith(b"+OK")


def pass_reply(pki: TestPki, port: int, login: str, password: str) -> bytes:
    script = f"USER {login}\r\nPASS {password}\r\n".encode()
    transcript = raw_session(pki, port, script, b"\r\n-ERR")
    if b"\r\n-ERR" not in transcript:
        return transcript.split(b"\r\n")[2]
    return transcript[transcript.index(b"\r\n-ERR") + 2 :].split(b"\r\n")[0]


async def test_wrong_password_and_unknown_user_look_the_same(
    pop3_proxy: RunningProxy, pki: TestPki
) -> None:
    def both() -> tuple[bytes, bytes]:
        return (
            pass_reply(pki, pop3_proxy.port, MAILBOX, "wrong password"),
            pass_reply(pki, pop3_proxy.port, "nobody@contoso.com", PASSWORD),
        )

    wrong, unknown = await in_thread(both)
    assert wrong == unknown
    assert wrong.startswith(b"-ERR [AUTH]")


async def test_identity_provider_trouble_is_temporary(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki, idp: EntraEmulator
) -> None:
    listener = Listener(protocol="pop3", upstream_port=dovecot.ports.pop3s)
    proxy = await start_proxy(nursery, rig.write([listener]))
    idp.fail_next(503, count=5)
    try:
        reply = await in_thread(lambda: pass_reply(pki, proxy.port, MAILBOX, PASSWORD))
    finally:
        idp.fail_next(503, count=0)
    assert reply.startswith(b"-ERR [SYS/TEMP]"), reply


async def test_upstream_refusing_the_token_is_an_auth_failure(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.add_user("ghost-user@contoso.com", PASSWORD, mailbox="ghost@contoso.com")
    listener = Listener(protocol="pop3", upstream_port=dovecot.ports.pop3s)
    proxy = await start_proxy(nursery, rig.write([listener]))
    reply = await in_thread(lambda: pass_reply(pki, proxy.port, "ghost-user@contoso.com", PASSWORD))
    assert reply.startswith(b"-ERR [AUTH]"), reply
    # One line naming the likely cause, at warning level.
    [diagnosis] = [
        r
        for r in caplog.records
        if r.name == "xoauth2_proxy.session" and "the upstream rejected the token" in r.message
    ]
    assert diagnosis.levelname == "WARNING"
    assert "'ghost@contoso.com'" in diagnosis.message
    assert "Likely causes:" in diagnosis.message


async def test_token_without_the_pop_role_is_refused_locally(
    nursery: trio.Nursery,
    rig: ProxyRig,
    dovecot: Dovecot,
    pki: TestPki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig.add_user(OTHER_MAILBOX, PASSWORD, app="roleless")
    listener = Listener(protocol="pop3", upstream_port=dovecot.ports.pop3s)
    proxy = await start_proxy(nursery, rig.write([listener]))
    reply = await in_thread(lambda: pass_reply(pki, proxy.port, OTHER_MAILBOX, PASSWORD))
    assert reply.startswith(b"-ERR [SYS/TEMP]"), reply
    assert "POP.AccessAsApp" in caplog.text
    assert "admin consent" in caplog.text


async def test_user_limited_to_imap_cannot_use_pop3(
    nursery: trio.Nursery, rig: ProxyRig, dovecot: Dovecot, pki: TestPki
) -> None:
    rig.add_user(OTHER_MAILBOX, PASSWORD, protocols=("imap",))
    listener = Listener(protocol="pop3", upstream_port=dovecot.ports.pop3s)
    proxy = await start_proxy(nursery, rig.write([listener]))
    reply = await in_thread(lambda: pass_reply(pki, proxy.port, OTHER_MAILBOX, PASSWORD))
    assert reply.startswith(b"-ERR [AUTH]"), reply
