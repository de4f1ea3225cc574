"""The session driver on its own, with trio's in-memory streams as the client."""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

import trio
import trio.testing
import trustme

from broker.claims import Expectations
from broker.model import AccessToken
from broker.source import CachingTokenSource
from proxy.config import Limits, ListenerConfig, Protocol
from proxy.hashpool import HashPool
from proxy.identities import Authenticator, Identity
from proxy.net.session import Services, Session
from proxy.protocol import replies
from proxy.protocol.events import Refusal
from proxy.protocol.imap import ImapAuth
from proxy.protocol.modes import AuthSettings, ClientTls, UpstreamTls

if TYPE_CHECKING:
    import pytest


def session(client: trio.abc.Stream) -> Session:
    listener = ListenerConfig(
        protocol=Protocol.IMAP,
        host="127.0.0.1",
        port=1143,
        tls=ClientTls.NONE,
        certificate=None,
        upstream_host="127.0.0.1",
        upstream_port=1,  # nothing listens there
        upstream_tls=UpstreamTls.IMPLICIT,
    )
    return Session(
        conn_id="imap#1",
        peer="127.0.0.1",
        listener=listener,
        machine=ImapAuth(AuthSettings(ClientTls.NONE, UpstreamTls.IMPLICIT)),
        services=Services(
            authenticator=Authenticator({}, hashes=HashPool(1)),
            tokens=CachingTokenSource({}),
            limits=Limits(),
        ),
        client=client,
        client_context=None,
        upstream_context=ssl.create_default_context(),
        timeout_reply=replies.IMAP_BYE_TIMEOUT,
    )


async def test_a_client_gone_before_the_greeting_ends_the_session_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.aclose()
    with trio.fail_after(5):
        await session(ours).run()  # no ExceptionGroup escapes to the server's "internal error"
    assert "imap#1: the client went away" in caplog.text
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


class ScriptedClient(trio.abc.Stream):
    """A client whose reads arrive in exactly the chunks given, one per receive_some, each
    as if already in the socket buffer (a read that has begun returns it, cancelled or not:
    that is what a reader stopped while holding a chunk looks like)."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.sent = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.chunks:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return self.chunks.pop(0)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sent += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_bytes_read_behind_starttls_close_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CVE-2011-0411 class: plaintext that arrived in its own read after the STARTTLS
    command (so the parser never saw it) must never be executed inside TLS. The reader
    holds it when the driver stops reading for the handshake: the session closes."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client = ScriptedClient(b"a1 STARTTLS\r\n", b"a2 LOGIN injected password\r\n")
    listener = ListenerConfig(
        protocol=Protocol.IMAP,
        host="127.0.0.1",
        port=1143,
        tls=ClientTls.STARTTLS,
        certificate=None,
        upstream_host="127.0.0.1",
        upstream_port=1,
        upstream_tls=UpstreamTls.IMPLICIT,
    )
    driver = Session(
        conn_id="imap#9",
        peer="127.0.0.1",
        listener=listener,
        machine=ImapAuth(AuthSettings(ClientTls.STARTTLS, UpstreamTls.IMPLICIT)),
        services=Services(
            authenticator=Authenticator({}, hashes=HashPool(1)),
            tokens=CachingTokenSource({}),
            limits=Limits(max_early_upstreams=0),  # no upstream before the client speaks
        ),
        client=client,
        client_context=server_context,
        upstream_context=ssl.create_default_context(),
        timeout_reply=replies.IMAP_BYE_TIMEOUT,
    )
    with trio.fail_after(10):
        await driver.run()
    assert "imap#9: client sent data right after STARTTLS; closing" in caplog.text
    assert b"a1 OK" not in client.sent  # refused before TLS began: no handshake either
    assert b"injected" not in client.sent


class NothingExpected:
    """A token source whose apps expect nothing checkable of their tokens (no audience, no
    tenant): only the role check stands between an unreadable token and the upstream."""

    async def token(self, app: str, *, mailbox: str | None = None) -> AccessToken:
        raise AssertionError("not asked for")

    async def expectations(self, app: str) -> Expectations:
        await trio.lowlevel.checkpoint()
        return Expectations(provider="microsoft")


async def test_a_token_whose_roles_cannot_be_read_is_never_sent() -> None:
    """Fail closed: an undecodable token counts as carrying no role, not every role."""
    driver = session(trio.testing.memory_stream_pair()[0])
    driver.services = Services(
        authenticator=Authenticator({}, hashes=HashPool(1)),
        tokens=NothingExpected(),
        limits=Limits(),
        app_providers={"contoso": "microsoft"},
    )
    identity = Identity(login="scanner", mailbox="scans@contoso.com", app="contoso")
    refused = await driver._check_claims(
        "scanner", identity, AccessToken("opaque-not-a-jwt", expires_at=2e9)
    )
    assert refused is not None
    assert refused.reason == "token lacks the IMAP.AccessAsApp role"
    assert refused.refusal is Refusal.UNAVAILABLE
