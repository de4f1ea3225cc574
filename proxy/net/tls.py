"""TLS contexts for both sides of the proxy, upstream sessions to resume, and a friendly
description of TLS failures."""

from __future__ import annotations

import collections
import ssl
import time
from typing import TYPE_CHECKING, Final

import trio

from proxy.config import ClientCertificates
from proxy.net.tlssocket import TlsSocketStream

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = [
    "SessionCache",
    "client_side_context",
    "describe_tls_error",
    "peer_certificate",
    "upstream_context",
]

#: Upstream servers whose TLS sessions one cache keeps (a listener has one upstream).
DEFAULT_SESSIONS: Final = 16


def client_side_context(
    certificate: Path,
    *,
    client_ca_file: Path | None = None,
    client_certificates: ClientCertificates = ClientCertificates.NONE,
) -> ssl.SSLContext:
    """The context our listeners present to legacy clients.

    ``certificate`` is one PEM file holding the private key and the certificate chain.
    TLS 1.2 is the floor: legacy clients older than that are not worth a downgrade.
    Client certificates, when asked for, must chain to ``client_ca_file`` and only to it:
    the system trust store is never used for them, since anyone can get a certificate from
    a public CA.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.2 renegotiation from clients: nothing needs it, it has a history of attacks,
    # and with TLS on the socket (tlssocket.py) OpenSSL would hold it until a pending
    # write finished.
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    )
    context.load_cert_chain(certificate)
    if client_certificates is not ClientCertificates.NONE:
        if client_ca_file is None:
            raise ValueError("client certificates need a client_ca_file")
        context.load_verify_locations(cafile=client_ca_file)
        context.verify_mode = (
            ssl.CERT_REQUIRED
            if client_certificates is ClientCertificates.REQUIRED
            else ssl.CERT_OPTIONAL
        )
    return context


def upstream_context(ca_file: Path | None) -> ssl.SSLContext:
    """The context for the upstream mail server: certificate and host name always checked,
    against the system trust store plus ``ca_file`` when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


class SessionCache:
    """TLS sessions to resume with upstream servers, for one client context.

    Resuming skips the server's certificate and signature and our check of them: less CPU
    on both sides, and one round trip less with TLS 1.2. It keeps what a full handshake
    proved: a session is only ever made by a full handshake whose certificate and host
    name :func:`upstream_context` verified, and Python refuses to resume a session with
    another context than the one that made it, so a session never crosses to another
    ``upstream_ca_file``. Within the context, sessions are kept per server name and port
    (the name the certificate was checked against), so none is offered to another server.

    Bounded: ``max_servers`` servers, least recently stored first out; a session past its
    lifetime (the server's ticket lifetime hint, or OpenSSL's session timeout) is dropped
    rather than offered. In memory only. TLS 1.3 tickets and TLS 1.2 tickets and session
    IDs are all :class:`ssl.SSLSession` objects here; the latest session from each
    connection replaces the one before (a server that refuses one issues another).
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        max_servers: int = DEFAULT_SESSIONS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_servers < 1:
            raise ValueError("max_servers must be at least 1")
        self.context = context
        self.max_servers = max_servers
        #: OpenSSL stamps sessions with the wall clock.
        self._clock = clock
        self._sessions: collections.OrderedDict[tuple[str, int], ssl.SSLSession] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._sessions)

    def __repr__(self) -> str:
        return f"<SessionCache {len(self._sessions)}/{self.max_servers} servers>"

    def get(self, server_hostname: str, port: int) -> ssl.SSLSession | None:
        """A session to offer ``server_hostname:port``, or ``None``."""
        key = (server_hostname, port)
        session = self._sessions.get(key)
        if session is not None and session.time + session.timeout <= self._clock():
            del self._sessions[key]
            return None
        return session

    def remember(self, server_hostname: str, port: int, session: ssl.SSLSession) -> None:
        """Keep ``session`` (from a connection to ``server_hostname:port`` made with this
        cache's context) for the next connection there."""
        key = (server_hostname, port)
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.max_servers:
            self._sessions.popitem(last=False)

    def forget(self, server_hostname: str, port: int) -> None:
        """Drop the session for ``server_hostname:port`` (say, after a failed handshake)."""
        self._sessions.pop((server_hostname, port), None)

    def recorder(self, server_hostname: str, port: int) -> Callable[[ssl.SSLSession], None]:
        """A callback that remembers the session it is given, for
        :meth:`~proxy.net.tlssocket.TlsSocketStream.wrap`'s ``on_session``."""

        def record(session: ssl.SSLSession) -> None:
            self.remember(server_hostname, port, session)

        return record


def describe_tls_error(exc: BaseException) -> str:
    """One line for the log saying what went wrong in a handshake."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"certificate verification failed: {cause.verify_message}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS error: {cause.reason or cause}"
        cause = cause.__cause__ or cause.__context__
    return f"TLS handshake failed: {exc}"


def peer_certificate(stream: trio.abc.Stream) -> bytes | None:
    """The certificate (DER) the peer presented in ``stream``'s finished handshake, already
    verified by it; ``None`` if it presented none or ``stream`` is not TLS. Read it right
    after the handshake: once the connection breaks, the TLS object may no longer say."""
    der: object = None
    try:
        if isinstance(stream, TlsSocketStream):
            der = stream.socket.getpeercert(binary_form=True)
        elif isinstance(stream, trio.SSLStream):
            der = stream.getpeercert(binary_form=True)
    except (ValueError, trio.NeedHandshakeError):  # the handshake did not finish
        return None
    return der if isinstance(der, bytes) else None
