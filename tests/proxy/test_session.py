"""The session driver on its own, with trio's in-memory streams as the client."""

from __future__ import annotations

import ssl

import trio
import trio.testing

from broker.source import CachingTokenSource
from proxy.config import Limits, ListenerConfig, Protocol
from proxy.hashpool import HashPool
from proxy.identities import Authenticator
from proxy.net.session import Services, Session
from proxy.protocol import replies
from proxy.protocol.imap import ImapAuth
from proxy.protocol.modes import AuthSettings, ClientTls, UpstreamTls


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


async def test_a_client_gone_before_the_greeting_ends_the_session_quietly() -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    await theirs.aclose()
    with trio.fail_after(5):
        await session(ours).run()  # no ExceptionGroup escapes to the server's "internal error"
